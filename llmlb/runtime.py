"""Everything one process needs to serve, built once per app from Settings.

The role decides the parts: a standalone llmlb is a balancer whose candidates are its
in-process node and any registered nodes; a balancer has only registered nodes; a node routes
to its in-process node alone (the same path, so it counts its own requests in flight) and runs
the heartbeat to its balancer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pluggy

from engines.base import LoadOptions

from .balancer.endpoints import EndpointWatch
from .balancer.inflight import InflightCounters
from .balancer.members import Cluster
from .balancer.proxy import Balancer
from .balancer.registry import NodeRegistry, StatusWatch
from .catalog import Catalog
from .config import Settings
from .db import Database
from .events import StatusEvents
from .hardware import node_memory
from .hf_stats import HFStats
from .history import History, RequestRecord
from .hub import Hub
from .metrics import Metrics
from .node.agent import NodeAgent, Reporter
from .node.local import LocalNode, files_here
from .node.member import LocalMember
from .node.pool import ModelPool
from .node.transport import InProcessNode
from .plugins import EngineRegistry, load_plugins
from .resolver import Resolver
from .serving.protocol import PromptLimits
from .supervisor import Supervisor

log = logging.getLogger(__name__)

HISTORY_PRUNE_SECONDS = 600.0
SWEEP_SECONDS = 5.0  # resuming pulls, clearing dead workers' counters: no hurry
EARLY_HEARTBEAT_SECONDS = 1.0  # download progress reaches the balancer at most this often


@dataclass
class Runtime:
    settings: Settings
    db: Database
    catalog: Catalog
    plugins: pluggy.PluginManager
    engines: EngineRegistry
    resolver: Resolver
    pool: ModelPool
    node: LocalNode
    hub: Hub
    events: StatusEvents
    inflight: InflightCounters
    registry: NodeRegistry | None
    cluster: Cluster
    balancer: Balancer
    reporter: Reporter
    agent: NodeAgent | None
    supervisor: Supervisor
    metrics: Metrics
    history: History

    def close(self) -> None:
        self.supervisor.stop()
        self.history.close()
        self.pool.unload_all()
        self.inflight.close()
        self.db.close()


def build_runtime(settings: Settings) -> Runtime:
    settings.models.models_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.files.database)
    catalog = Catalog(settings.files.supported_models)
    pm = load_plugins(settings.files.plugins_dir)
    engines = EngineRegistry(pm)
    resolver = Resolver(settings.models, settings.node, catalog, engines.format_table)
    inference = settings.inference
    pool = ModelPool(engines, max_loaded=inference.max_loaded_models,
                     keep_alive=inference.keep_alive_seconds,
                     max_queued=inference.max_queued_requests,
                     load_options=LoadOptions(context_length=inference.context_length,
                                              parallel_sequences=inference.parallel_sequences))
    node = LocalNode(resolver, pool)
    inflight = InflightCounters(Path(f"{settings.files.database}.inflight"))
    reporter = Reporter(settings.models, resolver, pool, engines, inflight)

    registry = None
    if settings.server.role != "node":
        registry = NodeRegistry(db, timeout=settings.cluster.node_timeout_seconds,
                                cooldown=settings.cluster.cooldown_seconds,
                                cooldown_max=settings.cluster.cooldown_max_seconds)
    local = None
    if settings.server.role != "balancer":
        name = settings.node.node_name if settings.server.role == "node" else "local"
        local = LocalMember(InProcessNode(name, node, PromptLimits.from_settings(inference)),
                            resolver, node_memory, reporter.report)
    cluster = Cluster(settings.cluster, registry, inflight, local, home=settings.files.home,
                      pool_size=settings.server.concurrency)
    metrics = Metrics(settings.files.metrics_dir, cluster.describe)
    # A node's requests come from its balancer, which keeps their history.
    history = History(db, settings.cluster.history_retention_days
                      if settings.server.role != "node" else 0)
    balancer = Balancer(settings.cluster, cluster, catalog,
                        lambda request: files_here(resolver, request) is not None, registry,
                        on_done=observer(metrics, history))

    models = settings.models
    stats = HFStats(db, models.hf_endpoint, models.hf_token, models.hf_stats_ttl_seconds,
                    models.hub_timeout_seconds)
    hub = Hub(db, catalog, resolver, cluster, stats)
    events = StatusEvents(hub.snapshot)
    resolver.on_progress(lambda _model_id: events.poke())

    supervisor = Supervisor(Path(f"{settings.files.database}.supervisor.lock"))
    supervisor.add("hub-reconcile", SWEEP_SECONDS, hub.reconcile)
    supervisor.add("inflight-sweep", SWEEP_SECONDS, inflight.sweep)
    agent = None
    if settings.server.role == "node":
        agent = NodeAgent(settings.node, settings.server.dev, db, reporter.report)
        supervisor.add("heartbeat", settings.cluster.heartbeat_seconds, agent.beat)

        def progress_soon(_model_id: str) -> None:
            if time.monotonic() - agent.last_beat >= EARLY_HEARTBEAT_SECONDS:
                supervisor.wake("heartbeat")

        resolver.on_progress(progress_soon)
    if registry is not None:
        forget_after = models.resolve_wait_seconds + settings.cluster.node_timeout_seconds
        supervisor.add("node-watch", 1.0, StatusWatch(registry, forget_after))
        supervisor.add("endpoint-check", settings.cluster.endpoint_check_seconds,
                       EndpointWatch(settings.cluster, settings.files.home, registry, inflight))
    if history.enabled:
        supervisor.add("history-prune", HISTORY_PRUNE_SECONDS, history.prune)
    return Runtime(settings, db, catalog, pm, engines, resolver, pool, node, hub,
                   events, inflight, registry, cluster, balancer, reporter, agent, supervisor,
                   metrics, history)


def observer(metrics: Metrics, history: History) -> Callable[[RequestRecord], None]:
    """What a forwarded request leaves behind: its metrics and its history row."""

    def done(o: RequestRecord) -> None:
        # A model nobody serves is a client's typo, not a label: one series per typo would
        # grow without bound.
        model = o.model if o.node is not None or o.status >= 500 else ""
        metrics.observe(model or "", o.node or "", o.status, o.latency, o.ttft, o.tokens_in,
                        o.tokens_out)
        history.add(o)

    return done

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

from .aliases import Aliases
from .balancer.accounting import Outcome
from .balancer.agent import NodeAgent, Reporter
from .balancer.endpoints import EndpointWatch
from .balancer.inflight import InflightCounters
from .balancer.members import Cluster, LocalMember
from .balancer.providers import Providers, ProviderWatch
from .balancer.proxy import Balancer
from .balancer.registry import NodeRegistry, StatusWatch
from .balancer.stored_responses import StoredResponses
from .balancer.upstream import InProcessNode
from .catalog import Catalog
from .config import Settings
from .db import Database
from .dispatch import Dispatcher
from .events import StatusEvents
from .hardware import node_memory
from .hf_stats import HFStats
from .history import History, RequestRow
from .hub import Hub
from .metrics import Metrics
from .model_pool import ModelPool
from .node import LocalNode
from .plugins import EngineRegistry, load_plugins
from .resolver import Resolver
from .response_store import ResponseStore
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
    dispatcher: Dispatcher
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
    responses: StoredResponses | None = None  # the Responses API's state (not on a node)

    def close(self) -> None:
        self.supervisor.stop()
        self.history.close()
        self.pool.unload_all()
        self.inflight.close()
        self.db.close()


def build_runtime(settings: Settings) -> Runtime:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database)
    catalog = Catalog(settings.supported_models)
    pm = load_plugins(settings.plugins_dir)
    engines = EngineRegistry(pm)
    resolver = Resolver(settings, catalog, engines.format_table)
    pool = ModelPool(engines, max_loaded=settings.max_loaded_models,
                     keep_alive=settings.keep_alive_seconds,
                     max_queued=settings.max_queued_requests,
                     load_options=LoadOptions(context_length=settings.context_length,
                                              parallel_sequences=settings.parallel_sequences))
    node = LocalNode(resolver, pool)
    dispatcher = Dispatcher([node])
    inflight = InflightCounters(Path(f"{settings.database}.inflight"))
    reporter = Reporter(settings, resolver, pool, engines, inflight)

    registry = None
    if settings.role != "node":
        registry = NodeRegistry(db, timeout=settings.node_timeout_seconds,
                                cooldown=settings.cooldown_seconds,
                                cooldown_max=settings.cooldown_max_seconds)
    local = None
    if settings.runs_models:
        name = settings.node_name if settings.role == "node" else "local"
        local = LocalMember(InProcessNode(name, dispatcher, PromptLimits.from_settings(settings)),
                            node, node_memory, reporter.report)
    providers = Providers(settings) if registry is not None else None
    if providers is not None:
        registry.sync_providers({n: p.url for n, p in providers.nodes.items()})  # type: ignore[union-attr]
    cluster = Cluster(settings, registry, inflight, local, providers)
    metrics = Metrics(settings.metrics_dir, cluster.describe)
    # A node's requests come from its balancer, which keeps their history.
    history = History(db, settings.history_retention_days if settings.role != "node" else 0)
    aliases = Aliases(db) if settings.role != "node" else None
    balancer = Balancer(settings, cluster, catalog, node, registry,
                        on_done=observer(metrics, history), aliases=aliases)

    stats = HFStats(db, settings.hf_endpoint, settings.hf_token, settings.hf_stats_ttl_seconds,
                    settings.hub_timeout_seconds)
    hub = Hub(db, catalog, resolver, cluster, stats, node_memory)
    events = StatusEvents(hub.snapshot)
    resolver.on_progress(lambda _model_id: events.poke())

    supervisor = Supervisor(Path(f"{settings.database}.supervisor.lock"))
    supervisor.add("hub-reconcile", SWEEP_SECONDS, hub.reconcile)
    supervisor.add("inflight-sweep", SWEEP_SECONDS, inflight.sweep)
    agent = None
    if settings.role == "node":
        agent = NodeAgent(settings, db, reporter.report)
        supervisor.add("heartbeat", settings.heartbeat_seconds, agent.beat)

        def progress_soon(_model_id: str) -> None:
            if time.monotonic() - agent.last_beat >= EARLY_HEARTBEAT_SECONDS:
                supervisor.wake("heartbeat")

        resolver.on_progress(progress_soon)
    if registry is not None:
        forget_after = settings.resolve_wait_seconds + settings.node_timeout_seconds
        supervisor.add("node-watch", 1.0, StatusWatch(registry, forget_after))
        supervisor.add("endpoint-check", settings.endpoint_check_seconds,
                       EndpointWatch(settings, registry, inflight))
        if providers is not None and providers.nodes:
            supervisor.add("provider-check", settings.provider_check_seconds,
                           ProviderWatch(providers, registry))
    if history.enabled:
        supervisor.add("history-prune", HISTORY_PRUNE_SECONDS, history.prune)
    responses = None
    if settings.role != "node":  # nodes are stateless: their balancer keeps responses
        store = ResponseStore(db, settings.responses_retention_days)
        responses = StoredResponses(store, balancer)
        supervisor.add("responses-prune", HISTORY_PRUNE_SECONDS, store.prune)
    return Runtime(settings, db, catalog, pm, engines, resolver, pool, node, dispatcher, hub,
                   events, inflight, registry, cluster, balancer, reporter, agent, supervisor,
                   metrics, history, responses)


def observer(metrics: Metrics, history: History) -> Callable[[Outcome], None]:
    """What a forwarded request leaves behind: its metrics and its history row."""

    def done(o: Outcome) -> None:
        # A model nobody serves is a client's typo, not a label: one series per typo would
        # grow without bound.
        model = o.model if o.node is not None or o.status >= 500 else ""
        metrics.observe(model or "", o.node or "", o.status, o.latency, o.ttft, o.tokens_in,
                        o.tokens_out)
        history.add(RequestRow(o.at, o.key_name, o.operation, o.model, o.node, o.status,
                               o.stream, round(o.latency * 1000, 2),
                               round(o.ttft * 1000, 2) if o.ttft is not None else None,
                               o.tokens_in, o.tokens_out, o.error))

    return done

"""The three roles llmlb plays (``LLMLB_ROLE``), each built by one function from the settings:

- ``standalone``: the balancer with an in-process node named "local": the OpenAI API, the
  model hub and the dashboard, registered nodes and endpoints beside its own models;
- ``balancer``: the same without a node of its own (it runs no model);
- ``node``: runs models for a balancer and answers only its balancer's credentials (and its
  own node key); it reports to the balancer by heartbeats and keeps no request history.

A builder only builds: threads start with ``Runtime.start`` in each worker, and what a role
needs once per instance, before any worker (the state migrated, the endpoints' key checked and
the first admin; a node's link to its balancer, checked), is its ``prepare``, which the server
runs first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint

from . import auth, config
from .aliases import Aliases
from .api import (
    admin_routes,
    alias_routes,
    dashboard_routes,
    dialect_routes,
    endpoint_routes,
    hub_routes,
    metrics_routes,
    node_routes,
    openai_routes,
    registry_routes,
    ws,
)
from .balancer.credentials import check_at_start
from .balancer.endpoints import EndpointWatch, instance_id
from .balancer.inflight import InflightCounters
from .balancer.members import Cluster, Member
from .balancer.providers import Providers, ProviderWatch, configured
from .balancer.proxy import Balancer
from .balancer.registry import NodeRegistry, StatusWatch
from .balancer.stored_responses import StoredResponses
from .catalog import Catalog
from .config import Settings, SettingsError
from .events import StatusEvents
from .hf_stats import HFStats
from .history import History, RequestRecord
from .hub import Hub
from .limiter import Limiter
from .metrics import Metrics
from .node.agent import NodeAgent, Reporter
from .node.hardware import node_memory
from .node.local import LocalNode, files_here
from .node.member import LocalMember
from .node.pool import ModelPool, load_options
from .node.transport import InProcessNode
from .plugins import EngineRegistry, load_plugins
from .resolver import Resolver
from .response_store import ResponseStore
from .runtime import ApiKeys, Authenticator, Runtime
from .serving.protocol import PromptLimits
from .state import StateUnavailable, open_state
from .supervisor import Supervisor

log = logging.getLogger(__name__)

# Every role answers the OpenAI API and the agents' APIs, /v0's manifests and status, and
# /metrics.
COMMON_ROUTES = (openai_routes.bp, dialect_routes.bp, registry_routes.bp, metrics_routes.bp)
BALANCER_ROUTES = (*COMMON_ROUTES, node_routes.bp, endpoint_routes.bp, alias_routes.bp,
                   admin_routes.bp, hub_routes.bp, ws.bp, dashboard_routes.bp)
NODE_ROUTES = (*COMMON_ROUTES, node_routes.node_bp)  # no users, no dashboard

HISTORY_PRUNE_SECONDS = 600.0
SWEEP_SECONDS = 5.0  # resuming pulls, clearing dead workers' counters: no hurry
EARLY_HEARTBEAT_SECONDS = 1.0  # download progress reaches the balancer at most this often


def standalone(settings: Settings) -> Runtime:
    parts = _Parts(settings)
    parts.in_process("local")
    parts.node_registry()
    return parts.runtime("standalone", settings.cluster.history_retention_days,
                         ApiKeys(parts.db, settings.server.dev), BALANCER_ROUTES)


def balancer(settings: Settings) -> Runtime:
    parts = _Parts(settings)
    parts.node_registry()
    return parts.runtime("balancer", settings.cluster.history_retention_days,
                         ApiKeys(parts.db, settings.server.dev), BALANCER_ROUTES)


def node(settings: Settings) -> Runtime:
    link = settings.node
    parts = _Parts(settings)
    reporter = parts.in_process(link.node_name)
    agent = NodeAgent(link, settings.server.dev, parts.db, reporter.report)
    parts.supervisor.add("heartbeat", settings.cluster.heartbeat_seconds, agent.beat)

    def progress_soon(_model_id: str) -> None:  # downloads show at the balancer soon
        if time.monotonic() - agent.last_beat >= EARLY_HEARTBEAT_SECONDS:
            parts.supervisor.wake("heartbeat")

    parts.resolver.on_progress(progress_soon)
    # Its requests come from its balancer, which keeps their history.
    return parts.runtime(f"node '{link.node_name}' for {link.balancer_url}", 0, agent,
                         NODE_ROUTES)


class _Parts:
    """What every role builds alike, each part once the parts it needs exist."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.models.models_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_state(settings.files)
        if settings.server.role in config.FRONT:  # the start refuses without it (prepare)
            check_at_start(settings.files.home, settings.files.endpoints_key, self.db)
        self.catalog = Catalog(settings.files.supported_models)
        self.engines = EngineRegistry(load_plugins(settings.files.plugins_dir))
        self.resolver = Resolver(settings.models, settings.node, self.catalog,
                                 self.engines.format_table)
        self.inflight = InflightCounters(Path(f"{settings.files.database}.inflight"))
        # Work of this host (its pulls, its workers' counters, a node's heartbeat), and work
        # of the whole cluster: one balancer of all that share the state runs it.
        self.supervisor = Supervisor(Path(f"{settings.files.database}.host.lock"))
        self.cluster_supervisor = Supervisor(self.db.leader_lock("supervisor"))
        self.instance_id = instance_id(self.db)
        self.local: Member | None = None
        self.pool: ModelPool | None = None
        self.registry: NodeRegistry | None = None

    def in_process(self, name: str) -> Reporter:
        """A node in this process, a member of its own balancer under ``name``."""
        inference = self.settings.inference
        self.pool = ModelPool(self.engines, max_loaded=inference.max_loaded_models,
                              keep_alive=inference.keep_alive_seconds,
                              max_queued=inference.max_queued_requests,
                              load_options=load_options(inference))
        transport = InProcessNode(name, LocalNode(self.resolver, self.pool),
                                  PromptLimits.from_settings(inference))
        reporter = Reporter(self.settings.models, self.resolver, self.pool, self.engines,
                            self.inflight)
        self.local = LocalMember(transport, self.resolver, node_memory, reporter.report)
        return reporter

    def node_registry(self) -> None:
        """Nodes and endpoints registered here, watched by the supervisor."""
        cluster = self.settings.cluster
        self.registry = NodeRegistry(self.db, timeout=cluster.node_timeout_seconds,
                                     cooldown=cluster.cooldown_seconds,
                                     cooldown_max=cluster.cooldown_max_seconds)
        forget_after = self.settings.models.resolve_wait_seconds + cluster.node_timeout_seconds
        self.cluster_supervisor.add("node-watch", 1.0, StatusWatch(self.registry, forget_after))
        self.cluster_supervisor.add("endpoint-check", cluster.endpoint_check_seconds,
                                    EndpointWatch(cluster, self.settings.files.home,
                                                  self.registry, self.inflight,
                                                  self.instance_id))

    def runtime(self, summary: str, history_days: float, authenticator: Authenticator,
                blueprints: tuple[Blueprint, ...]) -> Runtime:
        """The balancer over the members there are, the hub, and what they leave behind."""
        settings, resolver = self.settings, self.resolver
        front = self.registry is not None  # a balancer's: not a node's
        providers = self.hosted_providers() if front else None
        cluster = Cluster(settings.cluster, self.registry, self.inflight, self.local,
                          home=settings.files.home, pool_size=settings.server.concurrency,
                          providers=providers)
        metrics = Metrics(settings.files.metrics_dir, cluster.describe)
        history = History(self.db, history_days)
        balancer = Balancer(settings.cluster, cluster, self.catalog,
                            lambda request: files_here(resolver, request) is not None,
                            self.registry, on_done=observer(metrics, history),
                            aliases=Aliases(self.db) if front else None,
                            limiter=Limiter(self.db.quotas, settings.cluster.key_lease_seconds))
        responses = None
        if front:  # nodes are stateless: their balancer keeps the Responses API's state
            store = ResponseStore(self.db, settings.cluster.responses_retention_days)
            responses = StoredResponses(store, balancer)
            self.cluster_supervisor.add("responses-prune", HISTORY_PRUNE_SECONDS, store.prune)
        models = settings.models
        stats = HFStats(self.db, models.hf_endpoint, models.hf_token,
                        models.hf_stats_ttl_seconds, models.hub_timeout_seconds)
        hub = Hub(self.db, self.catalog, resolver, cluster, stats)
        events = StatusEvents(hub.snapshot)
        resolver.on_progress(lambda _model_id: events.poke())
        self.supervisor.add("hub-reconcile", SWEEP_SECONDS, hub.reconcile)
        self.supervisor.add("inflight-sweep", SWEEP_SECONDS, self.inflight.sweep)
        if history.enabled:
            self.cluster_supervisor.add("history-prune", HISTORY_PRUNE_SECONDS, history.prune)
        return Runtime(settings, summary, self.db, self.catalog, self.engines, resolver,
                       self.inflight, cluster, balancer, hub, events, metrics, history,
                       self.supervisor, self.cluster_supervisor, authenticator,
                       self.instance_id, blueprints, self.registry, self.pool, responses,
                       providers)

    def hosted_providers(self) -> Providers:
        """The hosted providers this balancer has keys for; their registry rows (made by
        ``prepare_balancer``) kept in step, and their model lists checked, by
        ``provider-check``."""
        assert self.registry is not None
        server, cluster = self.settings.server, self.settings.cluster
        providers = Providers(self.settings.providers, pool_size=server.concurrency,
                              connect_timeout=cluster.proxy_connect_timeout_seconds,
                              read_timeout=cluster.proxy_read_timeout_seconds)
        if providers.nodes:
            self.supervisor.add("provider-check",
                                self.settings.providers.provider_check_seconds,
                                ProviderWatch(providers, self.registry))
        return providers


def observer(metrics: Metrics, history: History) -> Callable[[RequestRecord], None]:
    """What a forwarded request leaves behind: its metrics and its history row."""

    def done(record: RequestRecord) -> None:
        # A model nobody serves is a client's typo, not a label: one series per typo would
        # grow without bound.
        model = record.model if record.node is not None or record.status >= 500 else ""
        metrics.observe(model or "", record.node or "", record.status, record.latency,
                        record.ttft, record.tokens_in, record.tokens_out)
        history.add(record)

    return done


# --- once per instance, before its workers --------------------------------------------------

def prepare_balancer(settings: Settings) -> None:
    """The state, migrated to the current schema (once, before any worker: a database that
    cannot be used is a SettingsError here, not a worker failing to boot); the key sealing
    endpoints' API keys, the one the other balancers of a shared state use; the first
    dashboard admin, when there is no user yet (its password shown once); a row for each
    hosted provider it has a key for, so that its first request finds them."""
    users, cluster = settings.users, settings.cluster
    try:
        db = open_state(settings.files)
    except StateUnavailable as exc:
        raise SettingsError(str(exc)) from None
    try:
        check_at_start(settings.files.home, settings.files.endpoints_key, db)
        generated = auth.ensure_first_admin(db, users.admin_username, users.admin_password)
        NodeRegistry(db, timeout=cluster.node_timeout_seconds, cooldown=cluster.cooldown_seconds,
                     cooldown_max=cluster.cooldown_max_seconds).sync_providers(
            configured(settings.providers))
    except StateUnavailable as exc:
        raise SettingsError(str(exc)) from None
    finally:
        db.close()
    if generated:
        log.warning("Created the first admin user '%s' with the password: %s  (shown once; "
                    "set LLMLB_ADMIN_PASSWORD to choose it)", users.admin_username, generated)


def check_node_link(settings: Settings) -> None:
    """A node needs its balancer: its URL and a node key. Raises SettingsError."""
    if not settings.node.balancer_url:
        raise SettingsError("a node needs its balancer: --balancer-url or LLMLB_BALANCER_URL")
    if not settings.node.node_api_key:
        raise SettingsError("a node needs LLMLB_NODE_API_KEY, a key with the node scope "
                            "created on the balancer (llmlb keys create --scope node)")


@dataclass(frozen=True)
class Role:
    build: Callable[[Settings], Runtime]
    prepare: Callable[[Settings], None]


ROLES = {"standalone": Role(standalone, prepare_balancer),
         "balancer": Role(balancer, prepare_balancer),
         "node": Role(node, check_node_link)}
assert tuple(ROLES) == config.ROLES, "each role its builder"


def build(settings: Settings) -> Runtime:
    return ROLES[settings.server.role].build(settings)


def prepare(settings: Settings) -> None:
    ROLES[settings.server.role].prepare(settings)

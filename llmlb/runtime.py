"""Everything one process needs to serve, built once per app from Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pluggy

from engines.base import LoadOptions

from .catalog import Catalog
from .config import Settings
from .db import Database
from .dispatch import Dispatcher
from .events import StatusEvents
from .hardware import node_memory
from .hf_stats import HFStats
from .hub import Hub
from .model_pool import ModelPool
from .node import LocalNode
from .plugins import EngineRegistry, load_plugins
from .resolver import Resolver

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        self.pool.unload_all()
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
    stats = HFStats(db, settings.hf_endpoint, settings.hf_token, settings.hf_stats_ttl_seconds,
                    settings.hub_timeout_seconds)
    hub = Hub(db, catalog, resolver, dispatcher, stats, node_memory)
    events = StatusEvents(hub.snapshot, on_tick=hub.reconcile)
    resolver.on_progress(lambda _model_id: events.poke())
    return Runtime(settings, db, catalog, pm, engines, resolver, pool, node, dispatcher, hub,
                   events)

"""What one process serves with: the parts its routes call, the blueprints it registers, who
may call it and its periodic tasks (in ``supervisor``). A role's builder (``roles.py``) makes
it from the settings without side effects; ``start`` (each worker, once it runs) and ``close``
bracket its life.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Protocol

from flask import Blueprint

from . import auth, errors
from .balancer.inflight import InflightCounters
from .balancer.members import Cluster
from .balancer.providers import Providers
from .balancer.proxy import Balancer
from .balancer.registry import NodeRegistry
from .balancer.stored_responses import StoredResponses
from .catalog import Catalog
from .config import Settings
from .events import StatusEvents
from .history import History
from .hub import Hub
from .metrics import Metrics
from .node.pool import ModelPool
from .plugins import EngineRegistry
from .resolver import Resolver
from .state import State
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class Authenticator(Protocol):
    """Who a request's key is, with the scopes that say what it may do there; raises the 401
    that says why a key is refused. ``sessions``: whether a dashboard login counts too."""

    sessions: bool

    def principal(self, key: str) -> auth.Principal: ...


class ApiKeys:
    """The balancer's keys (its state), and the dashboard's logins."""

    sessions = True

    def __init__(self, db: State, dev: bool) -> None:
        self.db, self.dev = db, dev

    def principal(self, key: str) -> auth.Principal:
        principal = auth.authenticate_key(self.db, key, dev=self.dev)
        if principal is None:
            raise errors.unauthorized("Invalid API key")
        return principal


@dataclass
class Runtime:
    settings: Settings
    summary: str  # what this llmlb is, for its start-up line
    db: State
    catalog: Catalog
    engines: EngineRegistry
    resolver: Resolver
    inflight: InflightCounters
    cluster: Cluster
    balancer: Balancer
    hub: Hub
    events: StatusEvents
    metrics: Metrics
    history: History
    supervisor: Supervisor  # this host's periodic work
    cluster_supervisor: Supervisor  # the cluster's: one balancer of all that share the state
    authenticator: Authenticator
    instance_id: str  # who this llmlb is, to itself (endpoints.INSTANCE_HEADER)
    blueprints: tuple[Blueprint, ...]
    registry: NodeRegistry | None = None  # where nodes and endpoints register
    pool: ModelPool | None = None  # where models run
    responses: StoredResponses | None = None  # the Responses API's state (not on a node)
    providers: Providers | None = None  # the hosted providers it has keys for

    def start(self) -> None:
        """Start serving in this process (each gunicorn worker): the periodic tasks, the
        history's writer."""
        self.supervisor.start()
        self.cluster_supervisor.start()
        self.history.start()
        self.metrics.start()
        # What exists now lives as long as the process: keep it out of the collector's full
        # passes, which otherwise stall a request for tens of milliseconds now and then.
        gc.freeze()

    def close(self) -> None:
        if self.balancer.limiter is not None:
            self.balancer.limiter.close()
        self.supervisor.stop()
        self.cluster_supervisor.stop()
        self.history.close()
        self.metrics.close()
        if self.providers is not None:
            self.providers.close()
        if self.pool is not None:
            self.pool.unload_all()
        self.inflight.close()
        self.db.close()

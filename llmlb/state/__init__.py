"""The shared state of llmlb behind one interface: every fact all workers, and all balancers,
must agree on — users, API keys, session versions, failed logins, the request history, the
hub's pulls and stats, small settings, and the node registry.

Two engines implement it (``engine.Engine``): SQLite, embedded, the default
(``LLMLB_DATABASE``, one host), and PostgreSQL when ``LLMLB_DATABASE_URL=postgresql://…`` is
set (any number of balancers). The stores (``accounts.py``, ``records.py``) hold the SQL,
written once for both; nothing outside this package knows which engine runs. The node
registry's SQL (``balancer/registry.py``) has not moved in yet: it runs, unchanged but for
its locks and change notices, through ``conn()`` and ``transaction()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accounts import Keys, LoginFailures, Meta, Users
from .engine import Engine, LeaderLock, Result, StateUnavailable, Tx
from .records import HubStats, Registrations, Requests

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["State", "StateUnavailable", "open_state", "open_database", "LeaderLock", "Tx"]


@dataclass
class State:
    engine: Engine
    meta: Meta
    keys: Keys
    users: Users
    logins: LoginFailures
    requests: Requests
    registrations: Registrations
    hf_stats: HubStats

    @classmethod
    def on(cls, engine: Engine) -> State:
        return cls(engine, Meta(engine), Keys(engine), Users(engine), LoginFailures(engine),
                   Requests(engine), Registrations(engine), HubStats(engine))

    @property
    def description(self) -> str:
        return self.engine.description

    @property
    def shared(self) -> bool:
        """Whether balancers on other hosts may share this state."""
        return self.engine.shared

    def leader_lock(self, name: str) -> LeaderLock:
        return self.engine.leader_lock(name)

    # The engine's own statements, for SQL that has not moved into a store yet (the node
    # registry): the same calls as ``Database`` had, on either engine.
    def conn(self) -> Engine:
        return self.engine

    def transaction(self):  # noqa: ANN201 - a context manager of Tx
        return self.engine.transaction()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return self.engine.execute(sql, params)

    # Older names, kept for the callers that use them.
    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    def setdefault_meta(self, key: str, value: str) -> str:
        return self.meta.setdefault(key, value)

    def close(self) -> None:
        self.engine.close()


def open_database(target: str | Path, *, pool_size: int = 4, timeout: float = 3.0) -> State:
    """The state at a PostgreSQL URL or in an SQLite file; migrated to the current schema."""
    if isinstance(target, str) and target.split(":", 1)[0] in ("postgresql", "postgres"):
        from .postgres import PostgresEngine

        return State.on(PostgresEngine(target, pool_size=pool_size, timeout=timeout))
    from .sqlite import SQLiteEngine

    return State.on(SQLiteEngine(Path(target)))


def open_state(settings: Settings) -> State:
    """The state this llmlb is configured for."""
    return open_database(settings.database_url or settings.database,
                         pool_size=settings.database_pool_size,
                         timeout=settings.database_timeout_seconds)

"""The shared state of llmlb behind one interface: every fact all workers, and all balancers,
must agree on — users, API keys, session versions, failed logins, the request history, the
hub's pulls and stats, small settings, the node registry, and the agents' APIs' stored
responses and model aliases.

Two engines implement it (``engine.Engine``): SQLite, embedded, the default
(``LLMLB_DATABASE``, one host), and PostgreSQL when ``LLMLB_DATABASE_URL=postgresql://…`` is
set (any number of balancers). The stores (``accounts.py``, ``records.py``, ``members.py``,
``agents.py``, ``quotas.py``, ``usage.py``)
hold the SQL, written once for both; nothing outside this package knows which engine runs
(an import contract in setup.cfg keeps the engines' modules to it). A test that must write a
row as an older llmlb would goes through ``engine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .accounts import Keys, LoginFailures, Meta, Users
from .agents import Aliases, Responses
from .engine import Engine, LeaderLock, StateUnavailable, Tx
from .members import Members
from .quotas import Quotas
from .records import HubStats, Registrations, Requests
from .usage import UsageRollups

if TYPE_CHECKING:
    from ..config import FileSettings

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
    members: Members
    responses: Responses
    aliases: Aliases
    quotas: Quotas
    usage: UsageRollups

    @classmethod
    def on(cls, engine: Engine) -> State:
        usage = UsageRollups(engine)
        return cls(engine, Meta(engine), Keys(engine), Users(engine), LoginFailures(engine),
                   Requests(engine, usage), Registrations(engine), HubStats(engine),
                   Members(engine), Responses(engine), Aliases(engine), Quotas(engine), usage)

    @property
    def description(self) -> str:
        return self.engine.description

    @property
    def shared(self) -> bool:
        """Whether balancers on other hosts may share this state."""
        return self.engine.shared

    def leader_lock(self, name: str) -> LeaderLock:
        return self.engine.leader_lock(name)

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


def open_state(files: FileSettings) -> State:
    """The state this llmlb is configured for."""
    return open_database(files.database_url or files.database,
                         pool_size=files.database_pool_size or 4,
                         timeout=files.database_timeout_seconds)

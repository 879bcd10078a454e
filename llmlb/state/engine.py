"""The interface both database engines implement (``sqlite.py``, ``postgres.py``), and the
per-worker cache built on it.

An engine runs SQL written once for both: ``?`` placeholders, ``INSERT … ON CONFLICT``,
``RETURNING``, integer columns for booleans, seconds since the epoch as floating point. What
differs between engines stays behind these methods: connections, transactions, locking
(``Tx.lock``), telling other workers and balancers what changed (``Tx.changed`` and
``version``), schema migrations and the leader lock of periodic work.

A database that cannot be reached (down, restarting, every connection busy past the timeout)
raises ``StateUnavailable``, which the API answers with 503 ``state_unavailable``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .. import os_lock
from ..errors import StateUnavailable

__all__ = ["Cached", "Engine", "LeaderLock", "Result", "Row", "StateUnavailable", "Tx"]

V = TypeVar("V")


class Row(dict):
    """A result row by column name (``row["id"]``) or, as sqlite3's rows allow, by position."""

    __slots__ = ()

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return dict.__getitem__(self, key)


@dataclass
class Result:
    """A statement's rows (fetched at once) and how many rows it changed."""

    rows: list[Any] = field(default_factory=list)  # Row, or tuples when asked for
    rowcount: int = -1

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return self.rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


class Tx(Protocol):
    """One transaction: its statements commit together or not at all."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def lock(self, name: str) -> None:
        """Serialise with every other transaction that locks ``name`` until this one ends
        (a read, then a write based on it)."""

    def changed(self, topic: str) -> None:
        """Caches of ``topic`` in every worker of every balancer drop what they hold once this
        transaction commits."""


class LeaderLock(Protocol):
    """Held by one process at a time: the one that runs the periodic work."""

    def try_acquire(self) -> bool: ...

    def held(self) -> bool:
        """Whether the lock is still ours (a lost connection loses it)."""

    def release(self) -> None: ...


class Engine(ABC):
    """A database: SQLite (one host) or PostgreSQL (any number of balancers)."""

    #: what logs and errors may show: the path, or the URL without its password
    description: str
    #: whether balancers on other hosts may share it
    shared: bool = False
    #: whether one statement may both change rows and use them (``WITH x AS (UPDATE …)``)
    writable_ctes: bool = False

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """A transaction; commits when the block ends, rolls back when it raises."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False,
                ) -> Result:
        """One statement on its own (reads, and writes that need no transaction). With
        ``tuples``, rows are plain tuples in the order the statement names the columns (a read
        of thousands of rows, without a dict each)."""

    @abstractmethod
    def version(self, topic: str) -> Hashable | None:
        """Changes to ``topic`` so far, as a token that differs after each one; None while
        changes might go unseen (then nothing may be served from a cache). It never waits on
        the network or on another greenlet: ``Cached`` asks it under an OS lock (os_lock.py)."""

    @abstractmethod
    def leader_lock(self, name: str) -> LeaderLock: ...

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    def copy_rows(self, tx: Tx, table: str, columns: Sequence[str],
                  rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows at once (the request history; ``llmlb db copy``, ids included)."""
        tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                       f"({', '.join('?' * len(columns))})", rows)

    def continue_ids(self, tx: Tx, table: str) -> None:  # noqa: B027 - SQLite needs nothing
        """After rows were inserted with their ids: new rows get ids after theirs."""


class Cached:
    """Values read from the database, kept by this worker until their topic changes.

    The hot path (an API key per request, a session per dashboard request) reads from here:
    no round trip while nothing changed. A value read while a change commits is not kept
    under the old version, so a change is never hidden for longer than its notice takes.
    """

    def __init__(self, engine: Engine, topic: str, limit: int = 10_000) -> None:
        self.engine, self.topic, self.limit = engine, topic, limit
        self._version: Hashable | None = None
        self._values: dict[Hashable, Any] = {}
        self._lock = os_lock.lock()  # around dict lookups only: never waits

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        version = self.engine.version(self.topic)
        if version is None:
            return load()
        with self._lock:
            if version != self._version:
                self._values, self._version = {}, version
            elif key in self._values:
                return self._values[key]
        value = load()
        with self._lock:
            if self._version == version == self.engine.version(self.topic):
                if len(self._values) >= self.limit:  # unknown keys sprayed at us: start over
                    self._values = {}
                self._values[key] = value
        return value

    def update(self, key: Hashable, change: Callable[[Any], Any]) -> None:
        """Change a kept value in place (what this worker wrote itself, unshared)."""
        with self._lock:
            if key in self._values:
                self._values[key] = change(self._values[key])

"""The embedded engine: one SQLite file (WAL mode) shared by the workers of one host.

Connections are lent, one at a time, to whoever runs a statement or a transaction, and kept
for the next (not one per thread: under gevent a thread is a greenlet, one per request, and
opening a connection per request costs more than the statement); a transaction is ``BEGIN
IMMEDIATE``, so writers queue on
SQLite's lock instead of failing half-way, which also makes ``Tx.lock`` free: only one
writer runs at a time. What changed is counted per topic in the ``changes`` table, in the
transaction that made the change; a worker rereads those counters only when ``PRAGMA
data_version`` (a read of shared memory) says another connection committed. The leader of
periodic work holds a file lock next to the database.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import os_lock
from ..locks import FileLeaderLock, FileLock
from ..private_files import private_database, private_dir
from . import schema
from .engine import Engine, Result, Row, StateUnavailable

# Errors that mean "not now" rather than a bug: another writer holds the lock past the busy
# timeout, the disk is full or gone.
IDLE_CONNECTIONS = 16  # kept for the next statement; more are closed when given back
# How long a look at ``PRAGMA data_version`` stands for the next ones: a request asks up to
# three times (its key, the aliases, the members), and under load a balancer serves a few
# requests a millisecond; a look costs as much as ten of those asks (SQLite's shared lock, two
# system calls). So another process's change is seen within 10 ms; any statement of this
# process's own starts a new look.
FRESH_SECONDS = 0.01
_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open", "database or disk is full")


def _row(cursor: sqlite3.Cursor, values: tuple) -> Row:
    return Row(zip([d[0] for d in cursor.description], values, strict=True))


@contextmanager
def _unavailable_on_transient() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        if any(word in str(exc).lower() for word in _TRANSIENT):
            raise StateUnavailable(f"the SQLite database is unavailable: {exc}") from exc
        raise


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.topics: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        cur = self.conn.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        return Result(rows, cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def lock(self, name: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already made this the only writer."""

    def changed(self, topic: str) -> None:
        self.topics.add(topic)


class SQLiteEngine(Engine):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        if not path.parent.exists():
            private_dir(path.parent)
        private_database(path)  # 0600 before SQLite creates it (and its -wal/-shm) as 0644
        # How long a writer waits for another's lock before the state is unavailable.
        self.busy_timeout = 30.0
        self._idle: list[sqlite3.Connection] = []  # list.pop/append: atomic, no lock needed
        self._watch_lock = os_lock.lock()  # around SQLite's C calls only: never waits
        self._watch: sqlite3.Connection | None = None
        self._data_version = -1
        self._looked_at = float("-inf")  # time.monotonic() of the last look
        self._versions: dict[str, int] = {}
        self._migrate()

    # --- connections and statements ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = _row
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return conn

    @contextmanager
    def _borrowed(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._looked_at = float("-inf")  # what this process wrote: seen at the next look
            if len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:
                conn.close()

    def execute(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False,
                ) -> Result:
        with _unavailable_on_transient(), self._borrowed() as conn:
            cur = conn.cursor()
            if tuples:
                cur.row_factory = None
            cur.execute(sql, params)
            return Result(cur.fetchall() if cur.description else [], cur.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[_SQLiteTx]:
        with self._borrowed() as conn:
            with _unavailable_on_transient():
                conn.execute("BEGIN IMMEDIATE")
            tx = _SQLiteTx(conn)
            try:
                yield tx
                for topic in sorted(tx.topics):
                    conn.execute("INSERT INTO changes(topic, version) VALUES (?, 1) ON "
                                 "CONFLICT(topic) DO UPDATE SET version = version + 1",
                                 (topic,))
                with _unavailable_on_transient():
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # the connection goes back clean
                    conn.execute("ROLLBACK")
                raise

    # --- what changed ------------------------------------------------------------------------

    def version(self, topic: str) -> Hashable | None:
        with self._watch_lock:
            if self._watch is None:
                self._watch = self._connect()
                self._watch.row_factory = None  # plain tuples: this runs on every request
            now = time.monotonic()
            if now - self._looked_at < FRESH_SECONDS:
                return self._versions.get(topic, 0)
            data_version = self._watch.execute("PRAGMA data_version").fetchone()[0]
            self._looked_at = now
            if data_version != self._data_version:
                self._versions = dict(self._watch.execute("SELECT topic, version FROM changes"))
                self._data_version = data_version
            return self._versions.get(topic, 0)

    def leader_lock(self, name: str) -> FileLeaderLock:
        return FileLeaderLock(self.path.with_name(f"{self.path.name}.{name}.lock"))

    # --- schema ------------------------------------------------------------------------------

    def _migrate(self) -> None:
        # Workers start together: switching a new file to WAL needs it to themselves (SQLite
        # answers "database is locked" at once instead of waiting), so the first setup runs
        # under a file lock. WAL is a property of the file; later connections inherit it.
        with FileLock(self.path.with_name(self.path.name + ".init-lock")):
            self.execute("PRAGMA journal_mode=WAL")
            with self.transaction() as tx:
                version = tx.execute("PRAGMA user_version").fetchone()["user_version"]
                for i, script in enumerate(schema.SQLITE[version:], start=version + 1):
                    for statement in schema.statements(script):
                        tx.execute(statement)
                    tx.execute(f"PRAGMA user_version={i}")

    def schema_version(self) -> int:
        return self.execute("PRAGMA user_version").fetchone()["user_version"]

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None

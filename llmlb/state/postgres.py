"""The shared engine: PostgreSQL (psycopg 3 and its pool), for several balancers at once.

- **Connections**: a pool per worker, sized to its threads (``LLMLB_DATABASE_POOL_SIZE``),
  with ``LLMLB_DATABASE_TIMEOUT_SECONDS`` for connecting, for waiting on a pooled connection
  and for row locks. A read that meets a connection the server cut (a restart) is tried once
  more on a fresh one; after a failure the engine answers ``StateUnavailable`` at once for a
  moment instead of making every request wait out the timeout again.
- **What changed**: a transaction that calls ``Tx.changed(topic)`` sends ``NOTIFY`` on commit;
  a listener thread per worker (its own connection, ``LISTEN``) counts the notices. It also
  proves the server is there every half second: only while it has done so within
  ``LIVENESS_SECONDS`` may a cache be trusted, so a lost notice never hides a change longer.
- **Locks**: ``Tx.lock`` is a transaction-scoped advisory lock; the leader of periodic work
  holds a session advisory lock on a connection of its own (with TCP keepalives, so the server
  frees it within seconds of its holder's machine vanishing, and at once when a process dies).
  Its ``application_name`` says who leads: ``SELECT application_name FROM pg_stat_activity
  WHERE application_name LIKE 'llmlb leader%'``.
- **Schema**: migrations run under an advisory lock, once, whoever starts first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from . import schema
from .engine import Engine, Result, Row, StateUnavailable

log = logging.getLogger(__name__)

CHANNEL = "llmlb_changes"
LIVENESS_SECONDS = 1.5
LISTEN_POLL_SECONDS = 0.5
DOWN_SECONDS = 0.5  # after a failure, how long requests are answered 503 without trying
_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def _cooperate_with_gevent() -> None:
    """psycopg chooses how to wait for its socket when first imported, and gunicorn's master
    imports it (checking the database before forking) before a gevent worker patches
    ``select``: point its waits at the patched ones, or one greenlet's query would stall
    every other greenlet of the worker (psycopg itself picks these when imported after the
    patching)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    import selectors

    from psycopg import waiting

    waiting.wait = waiting.wait_poll
    waiting.DefaultSelector = selectors.DefaultSelector  # what wait_conn (connecting) uses


def describe_url(url: str) -> str:
    """The URL as logs may show it: no password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(zip(names, values, strict=True))


@functools.lru_cache(maxsize=512)
def _sql(text: str) -> str:
    """SQL written for both engines (``?`` placeholders) in psycopg's form (``%s``)."""
    return text.replace("%", "%%").replace("?", "%s")


def lock_key(name: str) -> int:
    """An advisory lock's 64-bit key for a name."""
    return int.from_bytes(hashlib.sha256(f"llmlb:{name}".encode()).digest()[:8], "big",
                          signed=True)


def _options(url: str, extra: str) -> str:
    """Server settings for a connection, after any the URL gives."""
    given = conninfo_to_dict(url).get("options") or ""
    return f"{given} {extra}".strip()


class _PgTx:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.topics: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        cur = self.conn.execute(_sql(sql), params)
        return Result(cur.fetchall() if cur.description else [], cur.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_sql(sql), rows)

    def lock(self, name: str) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(name),))

    def changed(self, topic: str) -> None:
        self.topics.add(topic)


class AdvisoryLeaderLock:
    """The leader lock of the cluster: a session advisory lock on a dedicated connection."""

    def __init__(self, conninfo: str, key: int) -> None:
        self.conninfo, self.key = conninfo, key
        self._conn: psycopg.Connection | None = None
        self._held = False

    def try_acquire(self) -> bool:
        try:
            if self._conn is None:
                self._conn = psycopg.connect(self.conninfo, autocommit=True)
            self._held = bool(self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                                 (self.key,)).fetchone()[0])
        except psycopg.Error as exc:
            log.debug("Leader lock: %s", exc)
            self._drop()
        return self._held

    def held(self) -> bool:
        if not self._held or self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:  # the connection is gone, and the lock with it
            log.warning("Lost the leader lock with the database connection: %s", exc)
            self._drop()
        return self._held

    def release(self) -> None:
        self._drop()  # closing the session releases its advisory locks

    def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresEngine(Engine):
    shared = True
    writable_ctes = True

    def __init__(self, url: str, *, pool_size: int, timeout: float) -> None:
        _cooperate_with_gevent()
        self.url, self.timeout = url, timeout
        self.description = describe_url(url)
        who = f"{socket.gethostname()} {os.getpid()}"
        self._conninfo = make_conninfo(
            url, connect_timeout=max(2, math.ceil(timeout)), application_name=f"llmlb {who}",
            options=_options(url, f"-c lock_timeout={int(timeout * 1000)}"))
        # The leader's and the listener's connections: a dead peer is noticed in seconds,
        # by the server (so the lock goes) and by us (so we stop trusting caches).
        keepalive = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                     "keepalives_count": 3}
        self._leader_conninfo = make_conninfo(
            url, connect_timeout=max(2, math.ceil(timeout)), application_name=f"llmlb leader "
            f"{who}", options=_options(url, "-c tcp_keepalives_idle=5 "
                                            "-c tcp_keepalives_interval=2 "
                                            "-c tcp_keepalives_count=3"), **keepalive)
        self._listen_conninfo = make_conninfo(self._conninfo, **keepalive)
        self._down_until = 0.0
        self._epoch = 0
        self._versions: dict[str, int] = {}
        self._alive_until = 0.0
        self._stop = threading.Event()
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StateUnavailable(f"cannot use the database {self.description}: "
                                   f"{str(exc).strip()}") from exc
        self._pool = ConnectionPool(
            self._conninfo, kwargs={"autocommit": True, "row_factory": _row_factory},
            min_size=1, max_size=max(1, pool_size), timeout=timeout, open=False,
            reconnect_timeout=max(timeout, 5.0), name="llmlb")
        self._pool.open(wait=False)
        self._listener = threading.Thread(target=self._listen, name="llmlb-state-listener",
                                          daemon=True)
        self._listener.start()

    # --- statements --------------------------------------------------------------------------

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise StateUnavailable(f"the database {self.description} is unavailable")

    def _failed(self, exc: BaseException) -> StateUnavailable:
        self._down_until = time.monotonic() + DOWN_SECONDS
        return StateUnavailable(f"the database {self.description} is unavailable: "
                                f"{str(exc).strip() or type(exc).__name__}")

    def execute(self, sql: str, params: Sequence[Any] = (), *, tuples: bool = False,
                ) -> Result:
        self._check_up()
        # A read may be tried again on a fresh connection (the pool kept one the server has
        # since cut); a write may not, as it may have committed before the answer was lost.
        tries = 2 if sql.lstrip()[:6].upper() == "SELECT" else 1
        for attempt in range(tries):
            try:
                with self._pool.connection() as conn, conn.cursor(
                        row_factory=tuple_row if tuples else None) as cur:
                    cur.execute(_sql(sql), params)
                    return Result(cur.fetchall() if cur.description else [], cur.rowcount)
            except PoolTimeout as exc:
                raise self._failed(exc) from exc
            except _ERRORS as exc:
                if attempt + 1 == tries:
                    raise self._failed(exc) from exc
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[_PgTx]:
        self._check_up()
        try:
            conn = self._pool.getconn()
        except PoolTimeout as exc:
            raise self._failed(exc) from exc
        tx = _PgTx(conn)
        try:
            with conn.transaction():
                yield tx
                for topic in sorted(tx.topics):
                    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, topic))
        except _ERRORS as exc:
            raise self._failed(exc) from exc
        finally:
            self._pool.putconn(conn)
        for topic in tx.topics:  # this worker sees its own change before the notice comes
            self._bump(topic)

    def copy_rows(self, tx: _PgTx, table: str, columns: Sequence[str],
                  rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows at once (``COPY``)."""
        with tx.conn.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def continue_ids(self, tx: _PgTx, table: str) -> None:
        tx.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                   f"COALESCE(MAX(id), 0) + 1, false) FROM {table}")

    # --- what changed ------------------------------------------------------------------------

    def version(self, topic: str) -> Hashable | None:
        if time.monotonic() > self._alive_until:
            return None
        return self._epoch, self._versions.get(topic, 0)

    def _bump(self, topic: str) -> None:
        self._versions[topic] = self._versions.get(topic, 0) + 1

    def _listen(self) -> None:
        failing: str | None = None
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._listen_conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._epoch += 1  # whatever changed while we did not listen: forget it all
                    self._alive_until = time.monotonic() + LIVENESS_SECONDS
                    if failing is not None:
                        log.warning("The database %s is reachable again", self.description)
                        self._pool.check()  # drop the connections the outage cut
                        failing = None
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            self._bump(notice.payload)
                        conn.execute("SELECT 1")
                        self._alive_until = time.monotonic() + LIVENESS_SECONDS
            except psycopg.Error as exc:
                self._alive_until = 0.0
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if failing is None:
                    log.warning("The database %s is unavailable: %s", self.description,
                                message)
                failing = message
                self._stop.wait(LISTEN_POLL_SECONDS)

    def leader_lock(self, name: str) -> AdvisoryLeaderLock:
        return AdvisoryLeaderLock(self._leader_conninfo, lock_key(f"leader:{name}"))

    # --- schema ------------------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection) -> None:
        key = lock_key("migrate")
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = row[0] if row else 0
            if version > len(schema.POSTGRES):
                log.warning("The database %s has schema version %d, newer than this llmlb's "
                            "(%d): a newer llmlb migrated it", self.description, version,
                            len(schema.POSTGRES))
            for i, script in enumerate(schema.POSTGRES[version:], start=version + 1):
                with conn.transaction():
                    for statement in schema.statements(script):
                        conn.execute(statement)
                    conn.execute("UPDATE schema_version SET version = %s", (i,))
                log.info("Database %s migrated to schema version %d", self.description, i)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def schema_version(self) -> int:
        return self.execute("SELECT version FROM schema_version").fetchone()["version"]

    def close(self) -> None:
        self._stop.set()
        self._listener.join(timeout=2 * LISTEN_POLL_SECONDS + 1)
        self._pool.close(timeout=2)

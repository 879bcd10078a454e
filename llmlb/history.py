"""The request history (LB-6): one row per request in the ``requests`` table, and its reading
for ``GET /v0/requests`` and the dashboard.

A request only appends its row to this worker's buffer; a writer thread per worker (started
with the worker) inserts what has gathered once a second in one transaction, so the request
path never waits on SQLite and the database sees one write per second per worker, not one per
request. A worker killed outright loses at most its last second of rows. Rows older than
``LLMLB_HISTORY_RETENTION_DAYS`` are deleted by the supervisor's ``history-prune`` task.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass

from .db import Database

log = logging.getLogger(__name__)
FLUSH_SECONDS = 1.0
MAX_BUFFERED = 100_000  # past this (the database is stuck) new rows are dropped, not memory
COLUMNS = ("at", "key_name", "operation", "model", "node", "status", "stream", "latency_ms",
           "ttft_ms", "tokens_in", "tokens_out", "error")


@dataclass(frozen=True)
class RequestRecord:
    """One forwarded request as the balancer saw it (``balancer/accounting.py``): what the
    metrics count and the history keeps. Times in seconds."""

    at: float
    key_name: str | None
    operation: str
    model: str | None
    node: str | None
    status: int
    stream: bool
    latency: float
    ttft: float | None
    tokens_in: int | None
    tokens_out: int | None
    error: str | None

    def row(self) -> tuple:
        """The ``requests`` row, in COLUMNS' order (times in milliseconds)."""
        return (self.at, self.key_name, self.operation, self.model, self.node, self.status,
                self.stream, round(self.latency * 1000, 2),
                round(self.ttft * 1000, 2) if self.ttft is not None else None,
                self.tokens_in, self.tokens_out, self.error)


class History:
    def __init__(self, db: Database, retention_days: float) -> None:
        self.db, self.retention_days = db, retention_days
        self._rows: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0

    def add(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        if len(self._rows) >= MAX_BUFFERED:
            return
        self._rows.append(record.row())

    def start(self) -> None:
        """Write what gathers, once a second, from now on (each worker, as it starts)."""
        if not self.enabled:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                                name="llmlb-history")
                self._thread.start()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Insert the buffered rows now; how many."""
        batch = []
        while self._rows and len(batch) < 10_000:
            batch.append(self._rows.popleft())
        if not batch:
            return 0
        try:
            with self.db.transaction() as conn:
                conn.executemany(f"INSERT INTO requests({','.join(COLUMNS)}) VALUES "
                                 f"({','.join('?' * len(COLUMNS))})", batch)
        except sqlite3.Error as exc:
            log.warning("Request history: %d rows not written: %s", len(batch), exc)
        return len(batch)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    # --- the supervisor's task, and reading -------------------------------------------------

    def prune(self) -> None:
        """``history-prune``: forget rows past the retention."""
        cutoff = time.time() - self.retention_days * 86400
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM requests WHERE at < ?", (cutoff,))

    def query(self, *, model: str | None = None, node: str | None = None,
              key_name: str | None = None, status: str | None = None,
              since: float | None = None, until: float | None = None, limit: int = 100,
              before_id: int | None = None) -> list[dict]:
        """Newest first. ``status``: one code ("429") or a class ("5xx", "error" = >= 400)."""
        where, args = [], []
        for column, value in (("model", model), ("node", node), ("key_name", key_name)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if status:
            if status == "error":
                where.append("status >= 400")
            elif len(status) == 3 and status.endswith("xx") and status[0].isdigit():
                where.append("status / 100 = ?")
                args.append(int(status[0]))
            else:
                where.append("status = ?")
                args.append(int(status))
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        if until is not None:
            where.append("at < ?")
            args.append(until)
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.conn().execute(sql + " ORDER BY id DESC LIMIT ?",
                                      (*args, limit)).fetchall()
        return [{**dict(r), "stream": bool(r["stream"])} for r in rows]

"""The request history (LB-6): one row per request in the ``requests`` table, and its reading
for ``GET /v0/requests`` and the dashboard.

A request only appends its row to this worker's buffer; a writer thread per worker (started
with the worker) inserts what has gathered once a second, so the request path never waits on
the database and the database sees a few transactions of ``BATCH`` rows per second per
worker, not one per request. A worker killed outright loses at most its last second of rows.
While the database is unavailable (PostgreSQL restarting) the rows stay in the buffer, up to
``MAX_BUFFERED``, and are written when it returns. Rows older than
``LLMLB_HISTORY_RETENTION_DAYS`` are deleted by the supervisor's ``history-prune`` task. Each
batch also adds its sums to the usage roll-ups (``usage.py``), in the same transaction. The SQL
is in ``state/records.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import NamedTuple

from . import usage
from .state import State, StateUnavailable

log = logging.getLogger(__name__)
FLUSH_SECONDS = 1.0
MAX_BUFFERED = 100_000  # past this (the database is away) new rows are dropped, not memory
# Rows per transaction. In a gevent worker the writer is a greenlet, and a transaction holds
# up the worker's requests while it runs in C (SQLite's library): at 5,000 requests a second,
# a second's rows in one transaction took ~17 ms and put ~6 ms on the p99 at 64 connections;
# in transactions of 500 (~1.5 ms each), with a turn for the requests between them, the p99
# is what it is with the history off (bench/RESULTS.md).
BATCH = 500


class RequestRecord(NamedTuple):
    """One forwarded request as the balancer saw it (``balancer/accounting.py``): what the
    metrics count and the history keeps. Times in seconds. (A named tuple: one is made per
    request, at a third of a frozen dataclass's cost.)"""

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
        """The ``requests`` row in ``state.records.REQUEST_COLUMNS``' order, as both engines
        store it (times in milliseconds, the flag as 0 or 1)."""
        return (self.at, self.key_name, self.operation, self.model, self.node, self.status,
                int(self.stream), round(self.latency * 1000, 2),
                round(self.ttft * 1000, 2) if self.ttft is not None else None,
                self.tokens_in, self.tokens_out, self.error)


class History:
    def __init__(self, db: State, retention_days: float) -> None:
        self.db, self.retention_days = db, retention_days
        self._rows: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unwritten = False  # the last flush found the database away
        self._dropped = 0

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0

    def add(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        if len(self._rows) >= MAX_BUFFERED:
            self._dropped += 1
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
        """Insert the buffered rows now; how many were written."""
        written = 0
        while self._rows:
            batch = []
            while self._rows and len(batch) < BATCH:
                batch.append(self._rows.popleft())
            try:
                self.db.requests.insert(batch, usage.rollup(batch))
            except StateUnavailable as exc:
                self._rows.extendleft(reversed(batch))  # kept, in order, for the next flush
                if not self._unwritten:
                    log.warning("Request history: %d rows kept in memory until the database "
                                "returns (%s)", len(self._rows), exc)
                self._unwritten = True
                return written
            except Exception as exc:  # not the database being away: these rows cannot go in
                log.warning("Request history: %d rows not written: %s", len(batch), exc)
                continue
            written += len(batch)
            time.sleep(0)  # a turn for the requests (in a gevent worker, gevent's sleep)
        if self._unwritten:
            log.warning("Request history: written again%s", f" ({self._dropped} rows over "
                        f"the limit of {MAX_BUFFERED} were dropped)" if self._dropped else "")
            self._unwritten, self._dropped = False, 0
        return written

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    # --- the supervisor's task, and reading -------------------------------------------------

    def prune(self) -> None:
        """``history-prune``: forget rows past the retention."""
        self.db.requests.prune(time.time() - self.retention_days * 86400)

    def query(self, *, model: str | None = None, node: str | None = None,
              key_name: str | None = None, status: str | None = None,
              since: float | None = None, until: float | None = None, limit: int = 100,
              before_id: int | None = None) -> list[dict]:
        """Newest first. ``status``: one code ("429") or a class ("5xx", "error" = >= 400)."""
        rows = self.db.requests.query(model=model, node=node, key_name=key_name, status=status,
                                      since=since, until=until, limit=limit,
                                      before_id=before_id)
        return [{**r, "stream": bool(r["stream"])} for r in rows]


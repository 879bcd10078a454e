"""The gunicorn worker llmlb runs in: gthread, plus a deadline for each request's headers.

gunicorn's gthread worker gives a connection to a pool thread once its first bytes arrive,
and that thread then reads the rest of the request line and headers from a blocking socket
with no time limit: 40 clients that each send half a request line and wait hold 40 threads,
and llmlb stops answering. Here a watchdog (one thread per worker) shuts down the socket of a
connection whose request line and headers are not complete ``LLMLB_HEADER_TIMEOUT_SECONDS``
after its first bytes; the blocked read returns, gunicorn drops the connection, the thread is
free again.

The request *body* is not covered: a client may still send a large body slowly. Behind nginx
(``deploy/nginx/llmlb.conf``) none of this reaches llmlb, since nginx reads whole requests
before passing them on; exposed without it, this bounds the cheap attack, not every one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from gunicorn.workers import gthread

from .config import OPTIONS_BY_ATTR

log = logging.getLogger(__name__)

class HeaderDeadlines:
    """Sockets whose request headers are awaited, by the thread reading them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # thread id -> [deadline or None, socket, peer, has the first data come?]
        self._armed: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        if timeout > 0:
            threading.Thread(target=self._watch, name="llmlb-header-deadlines",
                             daemon=True).start()

    def arm(self, sock: socket.socket, peer: Any,
            first_data: Callable[[], bool] | None = None) -> None:
        """Start the clock now, or once ``first_data()`` says the first bytes came (gunicorn
        lets a new connection's thread wait a while for them: that wait is gunicorn's, and
        ends with the connection parked, not with a slow client holding the thread)."""
        if self.timeout > 0:
            deadline = None if first_data else time.monotonic() + self.timeout
            with self._lock:
                self._armed[threading.get_ident()] = [deadline, sock, peer, first_data]

    def disarm(self) -> None:
        with self._lock:
            self._armed.pop(threading.get_ident(), None)

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            now, closed = time.monotonic(), []
            with self._lock:  # under the lock: a thread that just disarmed is never hit
                for ident, entry in list(self._armed.items()):
                    deadline, sock, peer, first_data = entry
                    if deadline is None:
                        if first_data():
                            entry[0] = now + self.timeout
                        continue
                    if deadline <= now:
                        del self._armed[ident]
                        with contextlib.suppress(OSError):  # closed meanwhile
                            sock.shutdown(socket.SHUT_RDWR)
                        closed.append(peer)
            for peer in closed:
                log.warning("Closed a connection from %s: its request headers did not arrive "
                            "within %.0f s", _address(peer), self.timeout)


def _address(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _header_timeout(app: Any) -> float:
    runtime = getattr(app, "extensions", {}).get("llmlb")
    if runtime is not None:
        return runtime.settings.server.header_timeout_seconds
    return OPTIONS_BY_ATTR["header_timeout_seconds"].default


class ThreadWorker(gthread.ThreadWorker):
    """``worker_class = "llmlb.gunicorn_worker.ThreadWorker"``: gthread with header deadlines."""

    def run(self) -> None:
        self.header_deadlines = HeaderDeadlines(_header_timeout(self.wsgi))
        super().run()

    def handle(self, conn: Any) -> Any:
        # gunicorn >= 24 hands over new connections before their first bytes (TConn has
        # data_ready then); older ones only readable connections.
        fresh = not getattr(conn, "initialized", True) and not getattr(conn, "data_ready", True)
        self.header_deadlines.arm(conn.sock, conn.client,
                                  (lambda: conn.data_ready) if fresh else None)
        try:
            return super().handle(conn)
        finally:
            self.header_deadlines.disarm()

    def handle_request(self, req: Any, conn: Any) -> Any:
        self.header_deadlines.disarm()  # the request line and headers are in
        return super().handle_request(req, conn)

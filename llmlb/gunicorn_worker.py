"""The gunicorn workers llmlb runs in: gthread, plus a deadline for each request's headers;
and, for both gthread and gevent (``gunicorn_gevent.py``), errors gunicorn answers itself (a
URL over its limit, a malformed request line or header) as JSON in the API's error shape
rather than gunicorn's HTML page. Also the access log's logger class, which escapes what
clients send (``logsafe.py``).

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
import functools
import json
import logging
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.workers import gthread

from . import errors, os_lock
from .config import OPTIONS_BY_ATTR
from .logsafe import escape

log = logging.getLogger(__name__)


def _status(resp: Any, environ: Any, request_time: Any) -> Any:
    status = resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


# The atoms of llmlb's access line, each as gunicorn's ``Logger.atoms`` computes it.
_CHEAP_ATOMS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "h": lambda resp, environ, t: environ.get("REMOTE_ADDR", "-"),
    "m": lambda resp, environ, t: environ.get("REQUEST_METHOD"),
    "U": lambda resp, environ, t: environ.get("PATH_INFO"),
    "H": lambda resp, environ, t: environ.get("SERVER_PROTOCOL"),
    "s": _status,
    "b": lambda resp, environ, t: getattr(resp, "sent", None) is not None and str(resp.sent)
    or "-",
    "M": lambda resp, environ, t: t.seconds * 1000 + int(t.microseconds / 1000),
}


# An access line's values repeat (the client, the method, the path): each escaped once
_escape = functools.lru_cache(maxsize=4096)(escape)


@functools.lru_cache(maxsize=8)
def _atoms_named(fmt: str) -> tuple[str, ...] | None:
    """The atoms a format uses, when all are cheap ones; else None."""
    names = tuple(dict.fromkeys(re.findall(r"%\(([^)]*)\)", fmt)))
    return names if all(n in _CHEAP_ATOMS for n in names) else None


class AccessLogger(Logger):
    """gunicorn's logger, with every value of the access line escaped: a CR/LF from a
    URL-decoded path cannot write a line of its own.

    The access line is written on every request, so for llmlb's format (or any made of the
    same atoms) only the atoms it names are computed, not gunicorn's ~20 plus every header
    and environ variable, and the record goes to the handlers directly (no look up the stack
    for the caller's file and line, which the access line does not show)."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        return {k: escape(v) if isinstance(v, str) else v for k, v in atoms.items()}

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # also what a configuration reload runs: the plan is made again
        self._plan: tuple | None = None

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        names, fmt, handler = self._plan or self._make_plan()
        if names is None:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled or not self.access_log.isEnabledFor(logging.INFO):
            return
        try:
            atoms = {}
            for name in names:
                value = _CHEAP_ATOMS[name](resp, environ, request_time)
                if isinstance(value, str):  # escaped (which quotes as gunicorn's SafeAtoms)
                    value = _escape(value)
                atoms[name] = value
            if handler is None:
                self.access_log.handle(self.access_log.makeRecord(
                    self.access_log.name, logging.INFO, "(access)", 0, fmt, (atoms,), None))
                return
            # What the handler would write, without a LogRecord and the handler's filters,
            # formatter and lookups that end in just this (a tenth of a proxied request's CPU)
            line = fmt % atoms + handler.terminator
            with handler.lock:
                handler.stream.write(line)
                handler.stream.flush()
        except Exception:
            self.error(traceback.format_exc())

    def _make_plan(self) -> tuple:
        """What each access line needs, worked out once per setup: the atoms the format names
        when all are cheap ones (else None: gunicorn's own ``access``), the format, and the
        access log's one plain stream (see ``_plain_stream``) or None."""
        fmt = self.cfg.access_log_format
        handler = self._plain_stream()
        lock = os_lock.rlock()
        if handler is not None and type(handler.lock) is not type(lock):
            # gevent's RLock, written in Python; what it guards writes a line and never
            # waits, so an OS lock serves (os_lock.py). Only under gevent: no other thread
            # can be writing meanwhile.
            handler.lock = lock
        self._plan = (_atoms_named(fmt), fmt, handler)
        return self._plan

    def _plain_stream(self) -> logging.StreamHandler | None:
        """The access log's one handler when it is a plain stream writing each message as it
        is (gunicorn's ``accesslog = "-"``, llmlb's), else None: then logging writes it."""
        log = self.access_log
        if len(log.handlers) != 1 or log.filters:
            return None
        handler = log.handlers[0]
        if type(handler) is not logging.StreamHandler or handler.filters \
                or handler.formatter is None or handler.formatter._fmt != "%(message)s" \
                or handler.level > logging.INFO:
            return None
        return handler


class _Captured:
    """Stands in for the client's socket while gunicorn handles an error: gunicorn decides
    the status (and logs the request) as always; its HTML page stays here."""

    def __init__(self) -> None:
        self.data = bytearray()

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, _flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    def status(self) -> tuple[int, str]:
        line = bytes(self.data).split(b"\r\n", 1)[0].decode("latin-1")
        _, code, reason = (line.split(" ", 2) + ["", ""])[:3]
        return (int(code), reason) if code.isdigit() else (500, "Internal Server Error")


class JSONErrors:
    """gunicorn's own error answers as llmlb's JSON errors (a worker class mixin)."""

    cfg: Any

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)  # type: ignore[misc]
        status, reason = captured.status()
        err = errors.unparsable_request(status, reason, str(exc),
                                        self.cfg.limit_request_line)
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except Exception:  # noqa: BLE001 - the client is gone: nothing more to tell it
            log.debug("Failed to send an error answer")

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


class ThreadWorker(JSONErrors, gthread.ThreadWorker):
    """``worker_class = "llmlb.gunicorn_worker.ThreadWorker"``: gthread with header deadlines
    and JSON errors."""

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

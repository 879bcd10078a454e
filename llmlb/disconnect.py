"""Noticing that a client left while its answer is still being computed.

A stream notices at its next write, when the WSGI server fails to send. A non-streaming answer
writes nothing until the end, so without a look at the socket its generation would run to
the last token for nobody. ``ClientWatch`` looks: the connection the WSGI server read the
request from (``gunicorn.socket`` under gunicorn, ``werkzeug.socket`` under werkzeug) becomes
readable with end-of-file when the client closes it. The node checks between tokens (at most
every ``INTERVAL`` seconds); the balancer, while it waits for the node's answer, looks at its
client every ``INTERVAL`` seconds too (``balancer/http1.py``) and drops the node's connection
when its own client left, which the node in turn notices.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Mapping
from typing import Any

INTERVAL = 0.1  # seconds between two looks at the socket while tokens come


class ClientLeft(Exception):
    """The client closed its connection before its answer was ready."""


def _poll() -> Any:
    """The system's poll: a look that never waits needs no event loop, and gevent's (where
    gevent patched ``select``) costs a hub round per look."""
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


_POLL = None


def readable_now(sock: Any) -> bool:
    """Whether ``sock`` has something to read (bytes, end-of-file, an error), without
    waiting. poll, not select: select() refuses descriptors above 1023."""
    global _POLL
    if _POLL is None:
        _POLL = _poll()
    poller = _POLL()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def peer_closed(sock: Any) -> bool | None:
    """True when the peer closed (or reset) the connection, False when it is open and quiet,
    None when it sent more bytes (a pipelined request: nothing can be said without reading
    them, and they must stay for the server)."""
    try:
        if not readable_now(sock):
            return False
        return None if sock.recv(1, socket.MSG_PEEK) else True
    except (ConnectionError, TimeoutError):
        return True
    except (OSError, ValueError):  # closed here, or not a socket: nothing to watch
        return False


class ClientWatch:
    """``watch()`` says whether the client of one request has left (cheap: it looks at the
    socket at most every ``INTERVAL`` seconds, and stops looking once the client sent more)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._next = 0.0
        self._left = False
        self._watching = True

    @classmethod
    def of(cls, environ: Mapping[str, Any]) -> ClientWatch | None:
        """The watch for a WSGI request; None when the server does not expose its socket."""
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        return cls(sock) if sock is not None and hasattr(sock, "fileno") else None

    def left(self) -> bool:
        if self._left or not self._watching:
            return self._left
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + INTERVAL
        closed = peer_closed(self.sock)
        if closed is None:
            self._watching = False
        self._left = bool(closed)
        return self._left

    def check(self) -> None:
        """Raise ``ClientLeft`` when the client has left."""
        if self.left():
            raise ClientLeft()

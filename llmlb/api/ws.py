"""``/ws/models``: ModelStatusChanged events over a WebSocket (HB-4).

Who may listen (SC-2), decided before the handshake so that a refusal is a plain JSON error:
an admin key in a header (``Authorization: Bearer`` or ``X-API-Key``), or a dashboard session
whose browser opens the socket from the dashboard's own host (the ``Origin`` is checked: a
page on another site must not ride on the cookie). No address is trusted, loopback included:
behind a reverse proxy every client comes from the proxy's address. Only in development mode
is a bare client (the seed's ``websockets.connect(uri)``) served.

A socket lasts only as long as what let it in: once a second it checks again, and closes
(1008, "log in again") when its dashboard session has ended (logout, a new password, the
session's lifetime, the user deleted) or its key was revoked.

Keys in the query string (``?api_key=``) are not accepted: URLs land in access logs and
browser histories, and no client needs them (programs send headers, the dashboard has its
session).

A socket holds a worker thread for its whole life, so at most ``LLMLB_MAX_WEBSOCKETS`` are
open per worker (set below ``LLMLB_THREADS``): more get a 503 and requests keep their threads.
The count is per process on purpose: it guards this process's threads.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import Blueprint, current_app, g, request, session
from flask.blueprints import BlueprintSetupState
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from .. import auth, errors, sessions
from .common import current_principal, runtime, session_principal

bp = Blueprint("ws", __name__)
sock = Sock()
log = logging.getLogger(__name__)

_SLOTS = "llmlb.websocket_slots"


@bp.record_once
def _slots(state: BlueprintSetupState) -> None:
    """This worker's sockets: at most LLMLB_MAX_WEBSOCKETS at once."""
    limit = state.app.extensions["llmlb"].settings.server.max_websockets
    state.app.extensions[_SLOTS] = (threading.BoundedSemaphore(limit), limit)


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _authority(scheme: str, netloc: str) -> str:
    return netloc.lower().removesuffix(_DEFAULT_PORTS.get(scheme, "\0"))


def _same_origin() -> bool:
    """The page that opens the socket comes from this host (the port counts, the scheme not:
    behind a TLS proxy without LLMLB_TRUSTED_PROXIES llmlb sees http where the page is https)."""
    origin = urlsplit(request.headers.get("Origin", ""))
    return origin.scheme in _DEFAULT_PORTS and (
        _authority(origin.scheme, origin.netloc) == _authority(request.scheme, request.host))


RECHECK_SECONDS = 1.0
POLICY_VIOLATION = 1008  # RFC 6455's close code for "your credentials no longer hold"


def _authorize() -> Callable[[], bool]:
    """Let the socket in or raise; returns the check that it may stay open."""
    rt = runtime()
    key = auth.key_from_headers(request.headers)
    if key is not None:
        principal = current_principal()  # 401 for a wrong key

        def still_valid() -> bool:
            again = auth.authenticate_key(rt.db, key, dev=rt.settings.server.dev)
            return again is not None and again.allows("admin")
    else:
        principal = session_principal()
        if principal is not None and not _same_origin():
            raise errors.origin_not_allowed(request.headers.get("Origin"))
        login = dict(session)

        def still_valid() -> bool:
            return sessions.session_principal(
                rt.db, login, dev=rt.settings.server.dev,
                lifetime=rt.settings.users.session_lifetime_seconds) is not None
    if principal is None:
        raise errors.unauthorized("A WebSocket needs an admin API key in a header "
                                  "('Authorization: Bearer <key>' or 'X-API-Key') or a "
                                  "dashboard session")
    if not principal.allows("admin"):
        raise errors.forbidden("admin")
    return still_valid


@bp.before_request
def admit() -> None:
    g.websocket_valid = (lambda: True) if runtime().settings.server.dev else _authorize()
    slots, limit = current_app.extensions[_SLOTS]
    if not slots.acquire(blocking=False):
        log.warning("WebSocket refused for %s: %d already open in this worker",
                    request.remote_addr, limit)
        raise errors.too_many_websockets(limit)
    g.websocket_slot = slots


@bp.teardown_request
def release(_exc: BaseException | None) -> None:
    slots = g.pop("websocket_slot", None)
    if slots is not None:  # after the socket closed: flask-sock returns only then
        slots.release()


@sock.route("/ws/models", bp=bp)
def model_events(ws) -> None:  # noqa: ANN001 - a simple_websocket.Server
    events = runtime().events
    still_valid = g.websocket_valid
    subscription = events.subscribe()
    checked = time.monotonic()
    try:
        while ws.connected:
            if time.monotonic() - checked >= RECHECK_SECONDS:
                checked = time.monotonic()
                if not still_valid():
                    ws.close(POLICY_VIOLATION, "The session or key that opened this socket "
                             "has ended: log in again")
                    break
            try:
                event = subscription.get(timeout=RECHECK_SECONDS)
            except queue.Empty:
                # Nothing to say: check that the client is still there, so a closed tab
                # frees this thread within a second.
                ws.receive(timeout=0)
                continue
            ws.send(json.dumps(event))
    except ConnectionClosed:
        pass
    finally:
        events.unsubscribe(subscription)

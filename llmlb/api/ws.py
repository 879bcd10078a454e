"""``/ws/models``: ModelStatusChanged events over a WebSocket (HB-4)."""

from __future__ import annotations

import json
import queue

from flask import Blueprint, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from .. import auth, errors
from .common import current_principal, runtime

bp = Blueprint("ws", __name__)
sock = Sock()


LOOPBACK = {"127.0.0.1", "::1"}


@bp.before_request
def authenticate():
    """Before the handshake, so a refusal is a plain 401 JSON response.

    The stream is read-only catalog status, so a client on the machine itself (the seed's
    bare `websockets.connect`) and dev mode need no credentials; anyone else needs an admin
    key (header, or ?api_key= since browsers cannot set headers on WebSockets) or the
    dashboard session. Behind a proxy, set LLMLB_TRUSTED_PROXIES so the client's own address
    is seen, not the proxy's.
    """
    rt = runtime()
    if rt.settings.dev or request.remote_addr in LOOPBACK:
        return None
    key = request.args.get("api_key")
    principal = (auth.authenticate_key(rt.db, key) if key else current_principal())
    if principal is None:
        raise errors.unauthorized()
    if not principal.allows("admin"):
        raise errors.forbidden("admin")
    return None


@sock.route("/ws/models", bp=bp)
def model_events(ws) -> None:  # noqa: ANN001 - a simple_websocket.Server
    events = runtime().events
    subscription = events.subscribe()
    try:
        while ws.connected:
            try:
                event = subscription.get(timeout=1.0)
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

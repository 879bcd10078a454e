"""What every blueprint shares: the runtime, authentication, JSON bodies and responses."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from functools import wraps
from typing import Any

from flask import Response, current_app, g, jsonify, request, session

from .. import auth, errors, sessions
from ..balancer.proxy import Forwarded
from ..disconnect import ClientWatch
from ..runtime import Runtime
from ..storage import requested_model_id
from ..wire import parse_json_object

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_HEADER = "X-CSRF-Token"


def runtime() -> Runtime:
    return current_app.extensions["llmlb"]


def registry():  # noqa: ANN201 - the NodeRegistry
    """The node registry, for blueprints registered only where there is one."""
    found = runtime().registry
    assert found is not None
    return found


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(sent: str | None) -> None:
    expected = session.get("csrf")
    if not expected or not sent or not auth.same_secret(sent, expected):
        raise errors.csrf_failed()


def current_principal() -> auth.Principal | None:
    """The key's principal (the role's authenticator decides, 401 for a key it refuses),
    else, where the role has dashboard users, the logged-in user's (CSRF-checked when
    unsafe)."""
    rt = runtime()
    key = auth.key_from_headers(request.headers)
    if key is not None:
        return rt.authenticator.principal(key)
    if not rt.authenticator.sessions:
        return None
    principal = session_principal()
    if principal is not None and request.method in UNSAFE_METHODS:
        check_csrf(request.headers.get(CSRF_HEADER))
    return principal


def session_principal() -> auth.Principal | None:
    """The dashboard user of this request's session cookie, if it is a valid login still."""
    if "user" not in session:
        return None
    rt = runtime()
    return sessions.session_principal(rt.db, session, dev=rt.settings.server.dev,
                                      lifetime=rt.settings.users.session_lifetime_seconds)


def missing_credentials() -> errors.APIError:
    """The 401 for a request with neither a key nor a valid session: a dashboard call (its
    cookie names a user, or its page sent the CSRF header) is told its session ended."""
    if "user" in session or CSRF_HEADER in request.headers:
        return errors.session_ended()
    return errors.unauthorized()


def require(*scopes: str) -> Callable:
    """Route decorator: 401 without credentials, 403 without one of the scopes."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            principal = current_principal()
            if principal is None:
                raise missing_credentials()
            if not any(principal.allows(s) for s in scopes):
                raise errors.forbidden(" or ".join(scopes))
            g.principal = principal
            return view(*args, **kwargs)

        return wrapper

    return decorate


def json_body() -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it (413 when larger
    than the limit, chunked bodies included)."""
    return parse_json_object(request_bytes())


def request_bytes() -> bytes:
    """The request's body as sent, or a 413 when larger than the limit (chunked too)."""
    raw = request.get_data(cache=True)  # obeys MAX_CONTENT_LENGTH when Content-Length is set
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and len(raw) >= limit \
            and request.environ["wsgi.input"].read(1):
        # A chunked body is cut at the limit by werkzeug, silently: one byte more than the
        # limit means the client sent too much, not a shorter request.
        raise errors.request_too_large(limit)
    return raw


class Passthrough:
    """A streamed body handed to the WSGI server as it is; its ``close()`` (called by the
    server when the response ends, the client left, or never started reading) also frees
    what the answer holds."""

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._chunks, self._on_close = chunks, on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


def relay(forwarded: Forwarded) -> Response:
    """A node's answer as it comes: its status, headers and bytes, and who answered."""
    answer = forwarded.response
    if isinstance(answer.body, bytes):
        answer.close()
        response = Response(answer.body, status=answer.status, headers=answer.headers)
    else:
        response = Response(Passthrough(answer.body, answer.close), status=answer.status,
                            headers=answer.headers, direct_passthrough=True)
    if forwarded.node:
        response.headers["X-LLMLB-Node"] = forwarded.node
    return response


def forward_request(operation: str, watch_client: bool = True,
                    headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """Every proxied route (each dialect's): the request to the balancer as the caller sent
    it, with the caller's key limits, checked there once the model is known (403, 429) and
    given back when the answer ends; ``headers``, the client's that a hosted provider
    reads."""
    return relay(forward_as(runtime(), g.principal, operation, request_bytes(),
                            ClientWatch.of(request.environ) if watch_client else None,
                            headers))


def forward_as(rt: Runtime, principal: auth.Principal, operation: str, raw: bytes,
               client: ClientWatch | None, headers: tuple[tuple[str, str], ...] = (),
               ) -> Forwarded:
    """The one call every proxied request makes, through Flask or the fast path
    (``fastpath.py``): the key's name for the history, its limits for the balancer."""
    return rt.balancer.forward(operation, raw, principal.name, headers=headers, client=client,
                               quota=principal.quota)


def respond(result: dict, status: int = 200) -> Response:
    response = jsonify(result)
    response.status_code = status
    return response


# --- the hub, for admins (/api) and for a node's balancer (/v0/node) -----------------------

def register_model() -> Response:
    """Pull the body's ``model_id``: 202 while it downloads, 200 when already there. Also
    what a balancer asks of its nodes (``POST /v0/node/pull``)."""
    model_id = json_body().get("model_id")
    if not isinstance(model_id, str):
        raise errors.missing_parameter("model_id")
    result = runtime().hub.register(requested_model_id(model_id))
    return respond(result, status=202 if result["status"] == "Registered" else 200)


def delete_model(model_id: str) -> Response:
    return respond(runtime().hub.delete(requested_model_id(model_id)))

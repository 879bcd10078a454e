"""What every blueprint shares: the runtime, authentication, JSON bodies and responses."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, current_app, g, jsonify, request, session

from .. import auth, errors, sessions
from ..runtime import Runtime
from ..serving.body import parse_json_object
from ..serving.sse import SSEStream

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_HEADER = "X-CSRF-Token"


def runtime() -> Runtime:
    return current_app.extensions["llmlb"]


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(sent: str | None) -> None:
    expected = session.get("csrf")
    if not expected or not sent or not secrets.compare_digest(expected, sent):
        raise errors.APIError(403, "Missing or wrong CSRF token; reload the page",
                              type="permission_error", code="csrf_failed")


def current_principal() -> auth.Principal | None:
    """The key's principal, else the logged-in dashboard user's (CSRF-checked when unsafe)."""
    rt = runtime()
    key = auth.key_from_headers(request.headers)
    if key is not None:
        principal = auth.authenticate_key(rt.db, key, dev=rt.settings.dev)
        if principal is None:
            raise errors.unauthorized("Invalid API key")
        return principal
    principal = session_principal()
    if principal is not None and request.method in UNSAFE_METHODS:
        check_csrf(request.headers.get(CSRF_HEADER))
    return principal


def session_principal() -> auth.Principal | None:
    """The dashboard user of this request's session cookie, if it is a valid login still."""
    if "user" not in session:
        return None
    rt = runtime()
    return sessions.session_principal(rt.db, session, dev=rt.settings.dev,
                                      lifetime=rt.settings.session_lifetime_seconds)


def require(*scopes: str) -> Callable:
    """Route decorator: 401 without credentials, 403 without one of the scopes."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            principal = current_principal()
            if principal is None:
                raise errors.unauthorized()
            if not any(principal.allows(s) for s in scopes):
                raise errors.forbidden(" or ".join(scopes))
            g.principal = principal
            return view(*args, **kwargs)

        return wrapper

    return decorate


def json_body() -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it (413 when larger
    than the limit, chunked bodies included)."""
    raw = request.get_data(cache=True)  # obeys MAX_CONTENT_LENGTH when Content-Length is set
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and len(raw) >= limit \
            and request.environ["wsgi.input"].read(1):
        # A chunked body is cut at the limit by werkzeug, silently: one byte more than the
        # limit means the client sent too much, not a shorter request.
        raise errors.request_too_large(limit)
    return parse_json_object(raw)


def respond(result: dict | SSEStream, status: int = 200) -> Response:
    if isinstance(result, SSEStream):
        return Response(result, mimetype="text/event-stream", headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        })
    response = jsonify(result)
    response.status_code = status
    return response

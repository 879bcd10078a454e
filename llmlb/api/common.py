"""What every blueprint shares: the runtime, authentication, JSON bodies and responses."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Response, current_app, g, jsonify, request, session

from .. import auth, errors
from ..runtime import Runtime
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
    username = session.get("user")
    if username:
        principal = auth.user_principal(rt.db, username, dev=rt.settings.dev)
        if principal is not None:
            if request.method in UNSAFE_METHODS:
                check_csrf(request.headers.get(CSRF_HEADER))
            return principal
    return None


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
    """The request's JSON object, or a 400 saying what is wrong with it."""
    raw = request.get_data(cache=True)  # obeys MAX_CONTENT_LENGTH: 413 when larger
    if not raw.strip():
        raise errors.invalid_json("the body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_json(str(exc)) from None
    if not isinstance(data, dict):
        raise errors.invalid_request("The request body must be a JSON object")
    return data


def respond(result: dict | SSEStream, status: int = 200) -> Response:
    if isinstance(result, SSEStream):
        return Response(result, mimetype="text/event-stream", headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        })
    response = jsonify(result)
    response.status_code = status
    return response

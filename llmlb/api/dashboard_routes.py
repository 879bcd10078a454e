"""The dashboard's pages (HB-5): login, Models (Model Hub and Local tabs), Nodes, Playground,
API keys.

Pages are server-rendered shells; their scripts talk to the same JSON API as everyone else,
with the session cookie and a CSRF token. Every asset is served from ``/static``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, redirect, render_template, request, session, url_for

from .. import errors, sessions
from ..logins import LoginThrottle, attempt_login
from .common import check_csrf, csrf_token, runtime, session_principal

bp = Blueprint("dashboard", __name__)


@bp.app_context_processor
def template_globals() -> dict[str, Any]:
    principal = session_principal()
    return {"csrf_token": csrf_token, "user": principal.name if principal else None,
            "dev_mode": runtime().settings.server.dev}


def login_required(view: Callable) -> Callable:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any):
        if session_principal() is None:
            return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper


def _safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect a login to another host."""
    if not target or urlsplit(target).netloc or not target.startswith("/") \
            or target.startswith("//"):
        return url_for("dashboard.models")
    return target


@bp.get("/")
def index():
    return redirect(url_for("dashboard.models" if session.get("user") else "dashboard.login"))


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html", error=None)
    try:
        check_csrf(request.form.get("csrf_token"))
    except errors.APIError:
        return render_template("login.html",
                               error="Your session expired. Please try again."), 401
    rt = runtime()
    throttle = LoginThrottle(rt.db, rt.settings.users.login_max_failures,
                             rt.settings.users.login_window_seconds)
    outcome = attempt_login(throttle, request.remote_addr or "unknown",
                            request.form.get("username", "").strip(),
                            request.form.get("password", ""), dev=rt.settings.server.dev)
    if outcome.retry_after:
        refusal = errors.login_throttled(outcome.retry_after)
        return render_template("login.html", error=refusal.message), refusal.status, \
            refusal.headers
    if outcome.principal is None:
        return render_template("login.html", error="Wrong user name or password."), 401
    principal = outcome.principal
    session.clear()  # a new session on login: no fixation
    session.update(sessions.login_fields(rt.db, principal))
    session.permanent = True  # the cookie expires with the login, not only with the browser
    csrf_token()
    return redirect(_safe_next(request.args.get("next")))


@bp.post("/logout")
def logout():
    """Ends every session of the user, not only this browser's cookie (SC-3)."""
    check_csrf(request.form.get("csrf_token"))
    principal = session_principal()
    if principal is not None and principal.kind == "user":
        sessions.end_sessions(runtime().db, principal.name)
    session.clear()
    return redirect(url_for("dashboard.login"))


@bp.get("/models")
@login_required
def models():
    return render_template("models.html", page="models")


@bp.get("/nodes")
@login_required
def nodes():
    return render_template("nodes.html", page="nodes")


@bp.get("/requests")
@login_required
def requests_page():
    return render_template("requests.html", page="requests")


@bp.get("/usage")
@login_required
def usage_page():
    return render_template("usage.html", page="usage")


@bp.get("/playground")
@login_required
def playground():
    return render_template("playground.html", page="playground")


@bp.get("/keys")
@login_required
def keys():
    return render_template("keys.html", page="keys")

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

from .. import auth, errors
from .common import check_csrf, csrf_token, runtime

bp = Blueprint("dashboard", __name__)


@bp.app_context_processor
def template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "user": session.get("user"),
            "dev_mode": runtime().settings.dev}


def login_required(view: Callable) -> Callable:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any):
        rt = runtime()
        user = session.get("user")
        if not user or auth.user_principal(rt.db, user, dev=rt.settings.dev) is None:
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
    error = None
    if request.method == "POST":
        try:
            check_csrf(request.form.get("csrf_token"))
        except errors.APIError:
            error = "Your session expired. Please try again."
        else:
            rt = runtime()
            username = request.form.get("username", "").strip()
            principal = auth.check_login(rt.db, username, request.form.get("password", ""),
                                         dev=rt.settings.dev)
            if principal is not None:
                session.clear()  # a new session id on login: no fixation
                session["user"] = principal.name
                csrf_token()
                return redirect(_safe_next(request.args.get("next")))
            error = "Wrong user name or password."
    status = 401 if error else 200
    return render_template("login.html", error=error), status


@bp.post("/logout")
def logout():
    check_csrf(request.form.get("csrf_token"))
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


@bp.get("/playground")
@login_required
def playground():
    return render_template("playground.html", page="playground")


@bp.get("/keys")
@login_required
def keys():
    return render_template("keys.html", page="keys")

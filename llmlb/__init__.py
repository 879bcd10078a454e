"""llmlb: an OpenAI-compatible LLM load balancer and node runtime.

``create_app`` is the application factory; gunicorn imports ``wsgi:app`` which calls it.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import Flask, request

from .config import Settings, load_settings
from .logsafe import SafeFormatter

__all__ = ["create_app"]

log = logging.getLogger("llmlb")
LOG_FORMAT = "%(asctime)s [%(levelname)s] %(message)s"


def configure_logging(level: str) -> None:
    """Log to stderr, unless the host program (a test runner, an embedding app) already
    configured logging: then llmlb's records go to its handlers."""
    logger = logging.getLogger("llmlb")
    logger.setLevel(level.upper())
    if logging.getLogger().handlers:
        return
    if not any(getattr(h, "_llmlb", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter(LOG_FORMAT))
        handler._llmlb = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Build the app of the role the settings name, from Settings or from overrides on top of
    the environment. Nothing starts here: ``llmlb.server.start`` (gunicorn's workers do) and
    the role's ``prepare`` (once per instance, before them) do that."""
    from . import errors
    from .api import fastpath, keyed_sessions, security_headers
    from .balancer.credentials import KEY_FILE
    from .balancer.endpoints import INSTANCE_HEADER
    from .private_files import private_dir, private_existing
    from .roles import build

    settings = config if isinstance(config, Settings) else load_settings(config)
    configure_logging(settings.server.log_level)
    private_dir(settings.files.home)  # before anything is created in it (SC-4)
    private_existing(settings.files.home / KEY_FILE)
    rt = build(settings)

    app = Flask(__name__, static_folder="dashboard/static",
                template_folder="dashboard/templates")
    # No redirect from "a//b" to "a/b" (werkzeug's default: an HTML 308 that changes the
    # request's meaning, "/x" as a model id becoming "x"): the route sees the path as sent.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["SECRET_KEY"] = settings.users.secret_key or rt.db.setdefault_meta(
        "secret_key", secrets.token_hex(32))
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_SECURE"] = settings.users.secure_cookies
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(
        seconds=settings.users.session_lifetime_seconds)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = keyed_sessions.KeyedCallSessions()
    app.extensions["llmlb"] = rt

    errors.init_app(app)
    security_headers.init_app(app)
    for blueprint in rt.blueprints:
        app.register_blueprint(blueprint)

    worker = str(os.getpid())

    @app.after_request
    def tag_worker(response):  # which gunicorn worker answered: for operators behind nginx
        response.headers["X-LLMLB-Worker"] = worker
        if INSTANCE_HEADER in request.headers:
            # A balancer about to add an endpoint asks who answers: itself would be a loop.
            response.headers[INSTANCE_HEADER] = rt.instance_id
        if request.method == "OPTIONS" and response.status_code == 200 \
                and errors.is_api_path(request.path):
            # Flask's automatic OPTIONS answer is an empty "text/html" page: under the API,
            # "no content" says it plainly (the Allow header stays).
            response.status_code = 204
            response.set_data(b"")
            del response.headers["Content-Type"]
        return response

    # The proxied inference routes skip Flask's dispatch (api/fastpath.py).
    app.wsgi_app = fastpath.FastPath(app.wsgi_app, rt, settings.server.max_body_bytes,  # type: ignore
                                     worker, app.json.dumps, INSTANCE_HEADER)

    if settings.server.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.server.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n,  # type: ignore
                                x_port=n, x_prefix=n)

    if settings.server.dev:
        log.warning("=" * 72)
        log.warning("DEVELOPMENT MODE: the API key 'sk_debug' and the login admin/test are "
                    "accepted. Never run this on a network others can reach.")
        log.warning("=" * 72)
    log.info("llmlb ready (%s): models in %s, catalog %s (%d models), database %s",
             rt.summary, settings.models.models_dir, settings.files.supported_models,
             len(rt.catalog.models()), rt.db.description)
    return app

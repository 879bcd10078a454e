"""llmlb: an OpenAI-compatible LLM load balancer and node runtime.

``create_app`` is the application factory; gunicorn imports ``wsgi:app`` which calls it.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import Flask, request

from .config import Settings, load_settings

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
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._llmlb = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Build the app from Settings, or from overrides on top of the environment."""
    from . import auth, errors
    from .api import (
        admin_routes,
        alias_routes,
        dashboard_routes,
        dialect_routes,
        endpoint_routes,
        hub_routes,
        keyed_sessions,
        metrics_routes,
        node_routes,
        openai_routes,
        registry_routes,
        security_headers,
        ws,
    )
    from .private_files import private_dir
    from .runtime import build_runtime

    settings = config if isinstance(config, Settings) else load_settings(config)
    configure_logging(settings.log_level)
    private_dir(settings.home)  # before anything is created in it (SC-4)
    rt = build_runtime(settings)

    app = Flask(__name__, static_folder="dashboard/static",
                template_folder="dashboard/templates")
    # No redirect from "a//b" to "a/b" (werkzeug's default: an HTML 308 that changes the
    # request's meaning, "/x" as a model id becoming "x"): the route sees the path as sent.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["SECRET_KEY"] = settings.secret_key or rt.db.setdefault_meta(
        "secret_key", secrets.token_hex(32))
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_SECURE"] = settings.secure_cookies
    app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(
        seconds=settings.session_lifetime_seconds)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = keyed_sessions.KeyedCallSessions()
    app.extensions["llmlb"] = rt

    errors.init_app(app)
    security_headers.init_app(app)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(dialect_routes.bp)
    app.register_blueprint(registry_routes.bp)
    app.register_blueprint(metrics_routes.bp)
    if settings.role == "node":  # the balancer's internal API to it; no users, no dashboard
        app.register_blueprint(node_routes.node_bp)
    else:
        app.register_blueprint(node_routes.bp)
        app.register_blueprint(endpoint_routes.bp)
        app.register_blueprint(alias_routes.bp)
        app.register_blueprint(admin_routes.bp)
        app.register_blueprint(hub_routes.bp)
        ws.init_app(app, settings)
        app.register_blueprint(dashboard_routes.bp)

    worker = str(os.getpid())

    @app.after_request
    def tag_worker(response):  # which gunicorn worker answered: for operators behind nginx
        response.headers["X-LLMLB-Worker"] = worker
        if request.method == "OPTIONS" and response.status_code == 200 \
                and errors.is_api_path(request.path):
            # Flask's automatic OPTIONS answer is an empty "text/html" page: under the API,
            # "no content" says it plainly (the Allow header stays).
            response.status_code = 204
            response.set_data(b"")
            del response.headers["Content-Type"]
        return response

    if settings.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n,  # type: ignore
                                x_port=n, x_prefix=n)

    if settings.dev:
        log.warning("=" * 72)
        log.warning("DEVELOPMENT MODE: the API key 'sk_debug' and the login admin/test are "
                    "accepted. Never run this on a network others can reach.")
        log.warning("=" * 72)
    if settings.role != "node":
        generated = auth.ensure_first_admin(rt.db, settings.admin_username,
                                            settings.admin_password)
        if generated:
            log.warning("Created the first admin user '%s' with the password: %s  (shown once; "
                        "set LLMLB_ADMIN_PASSWORD to choose it)", settings.admin_username,
                        generated)
    # Periodic work (pulls a restart cut off, heartbeats): one process per instance runs it.
    rt.supervisor.start()
    # What exists now lives as long as the process: keep it out of the collector's full
    # passes, which otherwise stall a request for tens of milliseconds now and then.
    gc.freeze()
    log.info("llmlb ready (%s%s): models in %s, catalog %s (%d models), database %s",
             settings.role, f" '{settings.node_name}' for {settings.balancer_url}"
             if settings.role == "node" else "", settings.models_dir,
             settings.supported_models, len(rt.catalog.models()), settings.database)
    return app

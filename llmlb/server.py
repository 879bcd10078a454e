"""Running llmlb under gunicorn: the options both ``llmlb serve`` and ``gunicorn.conf.py`` use."""

from __future__ import annotations

from typing import Any

from .config import Settings


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    from gunicorn.config import KNOWN_SETTINGS

    known = {s.name for s in KNOWN_SETTINGS}
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        # Threads, not processes, for concurrency: a loaded model lives in its process, and
        # streams and WebSockets each hold a thread for their whole life. gthread, with a
        # deadline for request headers (slow clients must not hold the threads).
        "worker_class": "llmlb.gunicorn_worker.ThreadWorker",
        "threads": settings.threads,
        "timeout": 120,  # the arbiter's heartbeat; gthread keeps it alive during long streams
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        # The path without its query string: a secret a client puts in a URL (?api_key=...)
        # must not land in the log.
        "access_log_format": '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms',
        # gunicorn >= 24 opens a control socket at one fixed path per user; two llmlb
        # instances on a host would fight over it, and llmlb does not use it.
        "control_socket_disable": True,
    }
    return {k: v for k, v in options.items() if k in known}


def preflight(settings: Settings) -> None:
    """Check, in the master before any worker boots, what would make every worker fail:
    a worker that cannot start shows gunicorn's traceback and "Worker failed to boot"
    instead of the reason. Raises CatalogError with the entry at fault."""
    from .catalog import load_catalog

    load_catalog(settings.supported_models)


def serve(settings: Settings) -> None:
    """Run the app with gunicorn in the foreground (what ``llmlb serve`` does)."""
    from gunicorn.app.base import BaseApplication

    from . import create_app

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self):  # noqa: ANN202 - the WSGI app
            return create_app(settings)

    Server().run()

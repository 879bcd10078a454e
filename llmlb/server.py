"""Running llmlb under gunicorn: the options both ``llmlb serve`` and ``gunicorn.conf.py`` use."""

from __future__ import annotations

from typing import Any

from .config import GEVENT_CONNECTIONS, Settings


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    from gunicorn.config import KNOWN_SETTINGS

    known = {s.name for s in KNOWN_SETTINGS}
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        # Where models run, threads, not processes, carry concurrency: a loaded model lives in
        # its process, and streams and WebSockets each hold a thread for their whole life:
        # gthread, with a deadline for request headers (slow clients must not hold the
        # threads). A balancer runs no model and mostly waits on sockets: gevent holds 1,000
        # streams per worker for less CPU than gthread (bench/balancer.py), and a slow client
        # holds a greenlet, not a thread.
        "worker_class": ("llmlb.gunicorn_worker.ThreadWorker"
                         if settings.worker_class == "gthread" else settings.worker_class),
        "threads": settings.threads,
        "worker_connections": GEVENT_CONNECTIONS,  # gevent's limit; gthread's idle keep-alives
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
        # A worker that exits leaves its metric files: folded into one, scrapes stay fast.
        "child_exit": _child_exit,
        "worker_exit": _worker_exit,
    }
    return {k: v for k, v in options.items() if k in known}


def _worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits: its buffered request history goes to the database."""
    runtime = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("llmlb")
    if runtime is not None:
        runtime.history.close()


def _child_exit(server: Any, worker: Any) -> None:
    from .metrics import fold_dead_worker

    try:
        fold_dead_worker(worker.pid)
    except Exception:  # a metrics file must never take the master down
        server.log.exception("Folding the metrics of worker %s failed", worker.pid)


def preflight(settings: Settings) -> None:
    """Check, in the master before any worker boots, what would make every worker fail:
    a worker that cannot start shows gunicorn's traceback and "Worker failed to boot"
    instead of the reason. Raises CatalogError with the entry at fault, SettingsError for a
    node that cannot reach or authenticate to a balancer, or a balancer whose database
    cannot be used or that lacks the key its endpoints' API keys are sealed with."""
    from .catalog import load_catalog
    from .config import SettingsError
    from .metrics import prepare_directory

    load_catalog(settings.supported_models)
    prepare_directory(settings.metrics_dir)  # counters start at zero with the instance
    if settings.role != "node":
        from .balancer.credentials import check_at_start
        from .private_files import private_dir
        from .state import StateUnavailable, open_state

        private_dir(settings.home)
        try:
            state = open_state(settings)  # migrated here, once, before any worker starts
        except StateUnavailable as exc:
            raise SettingsError(str(exc)) from None
        try:
            check_at_start(settings.home, settings.endpoints_key, state)
        finally:
            state.close()
    if settings.role == "node":
        if not settings.balancer_url:
            raise SettingsError("a node needs its balancer: --balancer-url or "
                                "LLMLB_BALANCER_URL")
        if not settings.node_api_key:
            raise SettingsError("a node needs LLMLB_NODE_API_KEY, a key with the node scope "
                                "created on the balancer (llmlb keys create --scope node)")


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

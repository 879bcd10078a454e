"""Running llmlb under gunicorn: the options both ``llmlb serve`` and ``gunicorn.conf.py`` use,
and the two moments llmlb starts: ``preflight`` once per instance in gunicorn's master,
before any worker, and ``start`` in each worker once it has built the app."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask

from .config import GEVENT_CONNECTIONS, Settings

# llmlb's worker classes (JSON errors; header deadlines for gthread), by LLMLB_WORKER_CLASS.
WORKERS = {"gthread": "llmlb.gunicorn_worker.ThreadWorker",
           "gevent": "llmlb.gunicorn_gevent.GeventWorker"}


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    from gunicorn.config import KNOWN_SETTINGS

    known = {s.name for s in KNOWN_SETTINGS}
    server = settings.server
    options = {
        "bind": f"{server.host}:{server.port}",
        "workers": server.workers,
        # Where models run, threads, not processes, carry concurrency: a loaded model lives in
        # its process, and streams and WebSockets each hold a thread for their whole life:
        # gthread, with a deadline for request headers (slow clients must not hold the
        # threads). A balancer runs no model and mostly waits on sockets: gevent holds 1,000
        # streams per worker for less CPU than gthread (bench/balancer.py), and a slow client
        # holds a greenlet, not a thread.
        "worker_class": WORKERS[server.worker_class],
        "reuse_port": server.reuse_port,
        "threads": server.threads,
        "worker_connections": GEVENT_CONNECTIONS,  # gevent's limit; gthread's idle keep-alives
        "timeout": 120,  # the arbiter's heartbeat; gthread keeps it alive during long streams
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": server.log_level.lower(),
        # The path without its query string: a secret a client puts in a URL (?api_key=...)
        # must not land in the log. Every value escaped (logsafe.py): a CR/LF in a decoded
        # path must not write a line of its own.
        "access_log_format": '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms',
        "logger_class": "llmlb.gunicorn_worker.AccessLogger",
        # gunicorn >= 24 opens a control socket at one fixed path per user; two llmlb
        # instances on a host would fight over it, and llmlb does not use it.
        "control_socket_disable": True,
        "post_worker_init": _post_worker_init,
        # A worker that exits leaves its metric files: folded into one, scrapes stay fast.
        "child_exit": _child_exit,
        "worker_exit": _worker_exit,
    }
    return {k: v for k, v in options.items() if k in known}


def start(app: Flask) -> None:
    """Start serving in this process: its periodic tasks, its writers (each worker; a
    one-process server, such as the tests' werkzeug, calls it itself after ``prepare``)."""
    app.extensions["llmlb"].start()


def _post_worker_init(worker: Any) -> None:
    start(worker.wsgi)


def _worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits: its buffered request history goes to the database, its
    held metric counts to its files, what it reserved of keys' limits goes back, and its log
    is flushed and let go while the process still works."""
    runtime = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("llmlb")
    if runtime is not None:
        if runtime.balancer.limiter is not None:
            runtime.balancer.limiter.close()
        runtime.history.close()
        runtime.metrics.close()
    _release_log_handlers()


def _release_log_handlers() -> None:
    # In a gevent worker, logging's lock is gevent's; the interpreter's teardown clears
    # gevent's modules before the log handlers are collected, and the callback that drops
    # each handler from logging's list then fails on that lock: a TypeError traceback at
    # every stop (gevent issue 2148). Flushed and closed here, the handlers need no callback
    # afterwards: logging skips it once its list is empty.
    logging.shutdown()
    del logging._handlerList[:]  # type: ignore[attr-defined]


def _child_exit(server: Any, worker: Any) -> None:
    from .metrics import fold_dead_worker

    try:
        fold_dead_worker(worker.pid)
    except Exception:  # a metrics file must never take the master down
        server.log.exception("Folding the metrics of worker %s failed", worker.pid)


def preflight(settings: Settings) -> None:
    """Check and prepare, in the master before any worker boots, what would make every worker
    fail (a worker that cannot start shows gunicorn's traceback and "Worker failed to boot"
    instead of the reason), then what the role needs once (``roles.prepare``: the first admin,
    a node's link to its balancer; a balancer's state, migrated, and the key its endpoints'
    API keys are sealed with). Raises CatalogError with the entry at fault, SettingsError for
    a setting the role cannot run with (a database it cannot use included)."""
    from .catalog import load_catalog
    from .metrics import prepare_directory
    from .private_files import private_dir
    from .roles import prepare

    private_dir(settings.files.home)  # before anything is created in it (SC-4)
    load_catalog(settings.files.supported_models)
    prepare_directory(settings.files.metrics_dir)  # counters start at zero with the instance
    prepare(settings)


def serve(settings: Settings, load: Callable[[], Flask]) -> None:
    """Run the app ``load()`` builds (in each worker) with gunicorn in the foreground (what
    ``llmlb serve`` does)."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return load()

    Server().run()

"""The gevent worker of a balancer: gunicorn's, with its own error answers (a URL over the
limit, a malformed request) as JSON like every other error (see ``gunicorn_worker.py``).

A module of its own: importing it imports gevent, which a gthread llmlb never needs.
"""

from __future__ import annotations

from gunicorn.workers import ggevent

from .gunicorn_worker import JSONErrors


class GeventWorker(JSONErrors, ggevent.GeventWorker):
    """``worker_class = "llmlb.gunicorn_gevent.GeventWorker"``."""

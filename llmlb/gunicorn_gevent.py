"""The gevent worker of a balancer: gunicorn's, with its own error answers (a URL over the
limit, a malformed request) as JSON like every other error (see ``gunicorn_worker.py``).

A module of its own: importing it imports gevent, which a gthread llmlb never needs.
"""

from __future__ import annotations

import gevent
from gunicorn.workers import ggevent

from .gunicorn_worker import JSONErrors


class GeventWorker(JSONErrors, ggevent.GeventWorker):
    """``worker_class = "llmlb.gunicorn_gevent.GeventWorker"``."""

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201
        super().handle_request(listener_name, req, sock, addr)
        # A kept-alive connection whose next request is already in (the client sent it while
        # this one's access log, metrics and history were written) would be served at once,
        # without a turn of the hub: under saturation a few connections then take every
        # turn and the others wait seconds (64 streaming connections: p99 1.1 s, ~30 past
        # wrk's 2 s timeout). Each request ends with a turn for the others instead.
        gevent.sleep(0)

"""gunicorn settings for ``bench/balancer.py``'s ``scale`` part: llmlb's own (as
``gunicorn.conf.py``), plus two things only the benchmark does.

- ``BENCH_PIN=1``: each worker pinned to a core of its own (worker n to core n modulo the
  cores this process may use), so that "two workers on two cores" is what is measured.
- ``BENCH_REUSEPORT=1``: each worker listens on a socket of its own bound to the same
  address with ``SO_REUSEPORT`` (the kernel spreads new connections over them by a hash of
  the client's address) instead of all accepting from the master's one socket. The master
  then listens on ``BENCH_MASTER_SOCKET`` (a Unix socket nobody uses): a socket of its own in
  the ``SO_REUSEPORT`` group would take its share of connections and never accept them.

    gunicorn -c bench/gunicorn_scale.py wsgi:app
"""

import os
import socket
import sys

from llmlb.catalog import CatalogError
from llmlb.config import SettingsError, load_settings
from llmlb.server import gunicorn_options, preflight

try:
    _settings = load_settings()
    preflight(_settings)
except (SettingsError, CatalogError) as exc:
    sys.exit(f"llmlb: cannot start: {exc}")

globals().update(gunicorn_options(_settings))
_CORES = sorted(os.sched_getaffinity(0))
_REUSEPORT = os.environ.get("BENCH_REUSEPORT") == "1"
if _REUSEPORT:
    bind = [f"unix:{os.environ['BENCH_MASTER_SOCKET']}"]


class _Listener:
    """What gunicorn's gevent worker asks of a listener (its family, the socket)."""

    FAMILY = socket.AF_INET

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __getattr__(self, name: str):  # noqa: ANN204 - the socket's own
        return getattr(self.sock, name)


def post_fork(server, worker) -> None:  # noqa: ANN001 - gunicorn's hook
    if os.environ.get("BENCH_PIN") == "1":
        os.sched_setaffinity(0, {_CORES[worker.age % len(_CORES)]})
    if _REUSEPORT:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((_settings.host, _settings.port))
        sock.listen(2048)
        for inherited in worker.sockets:
            inherited.close()
        worker.sockets = [_Listener(sock)]

"""gunicorn settings for ``bench/balancer.py``'s ``scale`` part: llmlb's own (as
``gunicorn.conf.py``), plus one thing only the benchmark does.

- ``BENCH_PIN=1``: each worker pinned to a core of its own (worker n to core n modulo the
  cores this process may use), so that "two workers on two cores" is what is measured.

``SO_REUSEPORT`` (a socket per worker) is llmlb's own setting, ``LLMLB_REUSE_PORT``
(gunicorn's ``reuse_port``: each worker then binds its own socket).

    gunicorn -c bench/gunicorn_scale.py wsgi:app
"""

import os
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
_post_fork = globals().get("post_fork")


def post_fork(server, worker) -> None:  # noqa: ANN001 - gunicorn's hook
    if os.environ.get("BENCH_PIN") == "1":
        os.sched_setaffinity(0, {_CORES[worker.age % len(_CORES)]})
    if _post_fork is not None:
        _post_fork(server, worker)

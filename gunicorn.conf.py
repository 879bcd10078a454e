"""Production defaults for ``gunicorn -c gunicorn.conf.py wsgi:app``.

The values come from llmlb's settings (LLMLB_HOST, LLMLB_PORT, LLMLB_WORKERS, LLMLB_THREADS,
...), so this file and ``llmlb serve`` always agree. For a node that runs models, keep one
worker with several threads: every worker process would load its own copy of each model.
"""

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

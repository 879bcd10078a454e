"""Model aliases (AG-5): a name agents use (``claude-sonnet-4-5``, ``gpt-4o``) that an
operator maps to a list of models llmlb serves; a request for the alias goes to the first of
them that can serve it, and to the next when one fails before the first byte.

Kept in the ``aliases`` table (shared by every worker and, with PostgreSQL, every balancer);
each worker reads it through a cache of ``CACHE_SECONDS``, so a change reaches every worker
within that. An alias wins over a model of the same name: the operator asked for it.
"""

from __future__ import annotations

import json
import threading
import time

from . import errors
from .db import Database
from .storage import requested_model_id

CACHE_SECONDS = 2.0
MAX_TARGETS = 16


def alias_spec(name: object, models: object) -> tuple[str, list[str]]:
    """A checked alias: its name and models (ids as llmlb writes them, or an endpoint's own),
    or a 400 naming the field."""
    if not isinstance(name, str):
        raise errors.invalid_request("Invalid value for 'name': a string", "name")
    name = requested_model_id(name)
    if not isinstance(models, list) or not 1 <= len(models) <= MAX_TARGETS or \
            not all(isinstance(m, str) and m.strip() for m in models):
        raise errors.invalid_request(f"Invalid value for 'models': a list of 1 to {MAX_TARGETS} "
                                     "model ids", "models")
    targets = [m.strip() for m in models]
    if name in (t.lower() for t in targets):
        raise errors.invalid_request("Invalid value for 'models': an alias cannot name itself",
                                     "models")
    return name, targets


class Aliases:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, list[str]] = {}
        self._read_at = 0.0
        self._lock = threading.Lock()

    def all(self) -> dict[str, list[str]]:
        rows = self.db.conn().execute("SELECT name, models FROM aliases ORDER BY name")
        return {row["name"]: json.loads(row["models"]) for row in rows}

    def resolve(self, model_id: str) -> list[str] | None:
        """The models an alias stands for, or None when ``model_id`` is no alias."""
        if time.monotonic() - self._read_at > CACHE_SECONDS:
            with self._lock:
                if time.monotonic() - self._read_at > CACHE_SECONDS:
                    self._cache, self._read_at = self.all(), time.monotonic()
        return self._cache.get(model_id)

    def set(self, name: str, models: list[str]) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO aliases(name, models, updated_at) VALUES (?,?,?) "
                         "ON CONFLICT(name) DO UPDATE SET models=excluded.models, "
                         "updated_at=excluded.updated_at",
                         (name, json.dumps(models), time.time()))
        self._read_at = 0.0

    def remove(self, name: str) -> bool:
        with self.db.transaction() as conn:
            removed = conn.execute("DELETE FROM aliases WHERE name=?", (name,)).rowcount == 1
        self._read_at = 0.0
        return removed

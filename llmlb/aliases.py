"""Model aliases (AG-5): a name agents use (``claude-sonnet-4-5``, ``gpt-4o``) that an
operator maps to a list of models llmlb serves; a request for the alias goes to the first of
them that can serve it, and to the next when one fails before the first byte.

Kept in the shared state (``state/agents.py``: every worker and, with PostgreSQL, every
balancer); each worker keeps the table it read until a change is announced (the state's
``aliases`` topic), so a change reaches every worker at once. An alias wins over a model of
the same name: the operator asked for it.
"""

from __future__ import annotations

import json
import time

from . import errors
from .state import State
from .state.agents import ALIASES
from .state.engine import Cached
from .storage import requested_model_id

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
    def __init__(self, db: State) -> None:
        self.rows = db.aliases
        self._cache = Cached(db.engine, ALIASES, limit=1)

    def all(self) -> dict[str, list[str]]:
        return {row["name"]: json.loads(row["models"]) for row in self.rows.all()}

    def resolve(self, model_id: str) -> list[str] | None:
        """The models an alias stands for, or None when ``model_id`` is no alias."""
        return self._cache.get("all", self.all).get(model_id)

    def set(self, name: str, models: list[str]) -> None:
        self.rows.set(name, json.dumps(models), time.time())

    def remove(self, name: str) -> bool:
        return self.rows.remove(name)

"""The agents' APIs' state: stored responses of the Responses API (``responses``: the response
and the whole input it answered, by id, for the key that made it, until it expires) and model
aliases (``aliases``: a name standing for a list of models). The SQL only;
``balancer/stored_responses.py`` and ``aliases.py`` decide what the rows mean.

Aliases are read on every request, so each worker caches them (``aliases.py``); a change tells
every worker of every balancer (topic ``ALIASES``). Stored responses are read by id when a
request continues one: no cache, so another balancer finds a response the moment it is stored.
"""

from __future__ import annotations

from collections.abc import Hashable

from .engine import Engine, Row

ALIASES = "aliases"  # the change topic: an alias set or removed


class Responses:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put(self, response_id: str, owner: str, model: str | None, now: float,
            expires_at: float, input_json: str, response_json: str) -> None:
        self.engine.execute(
            "INSERT INTO responses (id, owner, model, created_at, expires_at, input, response) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
            "model = excluded.model, created_at = excluded.created_at, "
            "expires_at = excluded.expires_at, input = excluded.input, "
            "response = excluded.response",
            (response_id, owner, model, now, expires_at, input_json, response_json))

    def get(self, response_id: str, owner: str, now: float) -> Row | None:
        """The row's ``input`` and ``response`` (JSON text), unless it expired."""
        return self.engine.execute(
            "SELECT input, response FROM responses WHERE id = ? AND owner = ? AND "
            "expires_at > ?", (response_id, owner, now)).fetchone()

    def delete(self, response_id: str, owner: str, now: float) -> bool:
        return self.engine.execute(
            "DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at > ?",
            (response_id, owner, now)).rowcount == 1

    def prune(self, now: float) -> None:
        self.engine.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))


class Aliases:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def version(self) -> Hashable | None:
        """Changes to the aliases so far (``Engine.version``)."""
        return self.engine.version(ALIASES)

    def all(self) -> list[Row]:
        """Every alias: ``name`` and ``models`` (a JSON list), by name."""
        return self.engine.execute("SELECT name, models FROM aliases ORDER BY name").fetchall()

    def set(self, name: str, models_json: str, now: float) -> None:
        with self.engine.transaction() as tx:
            tx.execute("INSERT INTO aliases (name, models, updated_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET models = excluded.models, "
                       "updated_at = excluded.updated_at", (name, models_json, now))
            tx.changed(ALIASES)

    def remove(self, name: str) -> bool:
        with self.engine.transaction() as tx:
            removed = tx.execute("DELETE FROM aliases WHERE name = ?", (name,)).rowcount == 1
            if removed:
                tx.changed(ALIASES)
        return removed

"""Stored responses of the Responses API (AG-1): each response a key asked to ``store``, with
the whole input it answered, kept for ``LLMLB_RESPONSES_RETENTION_DAYS`` so that
``previous_response_id`` can continue from it and ``GET`` / ``DELETE /v1/responses/{id}``
find it. A response belongs to the key (or dashboard user) that made it: to anyone else it
does not exist.

The one place that reads and writes the ``responses`` table; a PostgreSQL state gives this
class a twin with the same methods.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .db import Database


@dataclass(frozen=True)
class StoredResponse:
    response: dict
    input: list  # the items it answered, earlier turns included


class ResponseStore:
    def __init__(self, db: Database, retention_days: float) -> None:
        self.db, self.retention_days = db, retention_days

    def put(self, owner: str, response: dict, input_items: list) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO responses(id, owner, model, created_at, expires_at, "
                "input, response) VALUES (?,?,?,?,?,?,?)",
                (response["id"], owner, response.get("model"), now,
                 now + self.retention_days * 86400,
                 json.dumps(input_items, ensure_ascii=False, separators=(",", ":")),
                 json.dumps(response, ensure_ascii=False, separators=(",", ":"))))

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        row = self.db.conn().execute(
            "SELECT input, response FROM responses WHERE id=? AND owner=? AND expires_at>?",
            (response_id, owner, time.time())).fetchone()
        if row is None:
            return None
        return StoredResponse(json.loads(row["response"]), json.loads(row["input"]))

    def delete(self, response_id: str, owner: str) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute("DELETE FROM responses WHERE id=? AND owner=? AND expires_at>?",
                               (response_id, owner, time.time()))
            return cur.rowcount == 1

    def prune(self) -> None:
        """``responses-prune``: forget responses past their retention."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM responses WHERE expires_at <= ?", (time.time(),))

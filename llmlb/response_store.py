"""Stored responses of the Responses API (AG-1): each response a key asked to ``store``, with
the whole input it answered, kept for ``LLMLB_RESPONSES_RETENTION_DAYS`` so that
``previous_response_id`` can continue from it and ``GET`` / ``DELETE /v1/responses/{id}``
find it. A response belongs to the key (or dashboard user) that made it: to anyone else it
does not exist.

Rows live in the shared state (``state/agents.py``): every worker, and with PostgreSQL every
balancer, finds a response the moment it is stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .state import State


@dataclass(frozen=True)
class StoredResponse:
    response: dict
    input: list  # the items it answered, earlier turns included


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResponseStore:
    def __init__(self, db: State, retention_days: float) -> None:
        self.rows, self.retention_days = db.responses, retention_days

    def put(self, owner: str, response: dict, input_items: list) -> None:
        now = time.time()
        self.rows.put(response["id"], owner, response.get("model"), now,
                      now + self.retention_days * 86400, _dumps(input_items), _dumps(response))

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        row = self.rows.get(response_id, owner, time.time())
        if row is None:
            return None
        return StoredResponse(json.loads(row["response"]), json.loads(row["input"]))

    def delete(self, response_id: str, owner: str) -> bool:
        return self.rows.delete(response_id, owner, time.time())

    def prune(self) -> None:
        """``responses-prune``: forget responses past their retention."""
        self.rows.prune(time.time())

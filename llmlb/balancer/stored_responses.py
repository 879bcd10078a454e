"""The Responses API's state on the balancer (AG-1): nodes are stateless, so the balancer
expands ``previous_response_id`` into the input before it forwards a request, and keeps each
response whose request did not say ``"store": false`` (OpenAI's default is to store).

What is kept is the response object as the node made it — a complete answer's body, or the
``response.completed`` (or ``.incomplete``) event of a stream, picked out of the bytes as they
pass (the stream itself is relayed untouched) — with the input it answered, earlier turns
included. A response belongs to the key that made it; to any other it does not exist (404).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from .. import errors
from ..auth import Principal
from ..dialects import RESPONSES
from ..disconnect import ClientWatch
from ..response_store import ResponseStore
from ..wire import parse_json_object
from .proxy import Balancer, Forwarded
from .upstream import NodeResponse

log = logging.getLogger(__name__)

_FINAL_EVENTS = (b"response.completed", b"response.incomplete")


def owner_of(principal: Principal) -> str:
    """Whose responses these are: a key's id, else the dashboard user's or dev mode's name."""
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    return f"{principal.kind}:{principal.name}"


class StoredResponses:
    def __init__(self, store: ResponseStore, balancer: Balancer) -> None:
        self.store, self.balancer = store, balancer

    def create(self, raw: bytes, principal: Principal,
               client: ClientWatch | None = None) -> Forwarded:
        """``POST /v1/responses``: continue from the previous response, forward, keep."""
        payload = parse_json_object(raw)
        owner = owner_of(principal)
        previous = payload.get("previous_response_id")
        items = _input_items(payload)
        if previous is not None:
            if not isinstance(previous, str):
                raise errors.invalid_request("Invalid value for 'previous_response_id': a "
                                             "string", "previous_response_id")
            stored = self.store.get(previous, owner)
            if stored is None:
                raise errors.response_not_found(previous, "previous_response_id")
            items = stored.input + _as_input(stored.response.get("output")) + items
            payload = {**payload, "input": items}
            raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        forwarded = self.balancer.forward(RESPONSES, raw, principal.name, payload,
                                          client=client, quota=principal.quota)
        answer = forwarded.response
        if payload.get("store") is False or answer.status != 200:
            return forwarded
        if not answer.streaming:
            self._keep(owner, answer.body, items)  # type: ignore[arg-type]
            return forwarded
        body = _Recorded(answer.body, lambda data: self._keep(owner, data, items))  # type: ignore[arg-type]
        return Forwarded(forwarded.node, NodeResponse(answer.status, answer.headers, body,
                                                      answer.close))

    def get(self, response_id: str, principal: Principal) -> dict:
        stored = self.store.get(response_id, owner_of(principal))
        if stored is None:
            raise errors.response_not_found(response_id)
        return stored.response

    def input_items(self, response_id: str, principal: Principal) -> dict:
        """``GET /v1/responses/{id}/input_items``: what it answered, newest first (OpenAI's
        default order)."""
        stored = self.store.get(response_id, owner_of(principal))
        if stored is None:
            raise errors.response_not_found(response_id)
        items = [dict(item, id=item.get("id") or f"item_{i}") for i, item in
                 enumerate(stored.input) if isinstance(item, dict)][::-1]
        return {"object": "list", "data": items, "has_more": False,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None}

    def delete(self, response_id: str, principal: Principal) -> dict:
        if not self.store.delete(response_id, owner_of(principal)):
            raise errors.response_not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def _keep(self, owner: str, data: bytes, items: list) -> None:
        try:
            response = json.loads(data)
        except ValueError:
            log.warning("A response to store was not JSON; not stored")
            return
        if isinstance(response, dict) and response.get("type") in ("response.completed",
                                                                    "response.incomplete"):
            response = response.get("response")
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        try:
            self.store.put(owner, response, items)
        except errors.StateUnavailable as exc:
            # The client has its answer (a stream's last byte is out): losing it for a
            # database that is down costs more than a later previous_response_id's 404.
            log.warning("Response %s answered but not stored (the database is unavailable: "
                        "%s); previous_response_id cannot continue from it", response["id"], exc)


def _input_items(body: dict) -> list[dict]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    given = body.get("input")
    if isinstance(given, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": given}]}]
    return list(given) if isinstance(given, list) else []


def _as_input(output: object) -> list:
    """A stored response's output items, as the input of the next turn."""
    return [item for item in output if isinstance(item, dict)] if isinstance(output, list) else []


class _Recorded:
    """A Responses stream relayed as it comes; the data of its final event (which holds the
    whole response) is handed to ``keep`` when the stream has ended."""

    def __init__(self, chunks: Iterator[bytes], keep) -> None:  # noqa: ANN001 - callable
        self._chunks, self._keep = chunks, keep

    def __iter__(self) -> Iterator[bytes]:
        return self._relay()

    def _relay(self) -> Iterator[bytes]:
        tail = b""  # the stream's last events: the final one comes last (or before [DONE])
        for chunk in self._chunks:
            yield chunk
            tail += chunk
            start = tail.rfind(b"\n\n", 0, max(0, tail.rfind(b"\n\n", 0, len(tail) - 2)))
            if start >= 0:  # keep the last two events only: the rest was relayed
                tail = tail[start + 2:]
        for block in reversed(tail.split(b"\n\n")):
            if any(marker in block[:120] for marker in _FINAL_EVENTS):
                self._keep(_data_of(block))
                break

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _data_of(block: bytes) -> bytes:
    """The ``data:`` of one server-sent event."""
    return b"\n".join(line[5:].lstrip() for line in block.split(b"\n")
                      if line.startswith(b"data:"))

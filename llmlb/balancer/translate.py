"""The Responses and Messages APIs for endpoints that do not speak them (AG-3): the balancer
translates such a request to chat completions, sends that, and translates the answer back —
the stream event by event — with the same converters a node uses (``dialects/responses.py``,
``dialects/messages.py``). An endpoint that serves the API itself (vLLM, Ollama, llama-server
do, in their recent versions) gets the request as the client sent it.

How to tell: the first request of an API to an endpoint goes as sent; an answer of 404 or 405
that is not about the model (FastAPI's ``{"detail":"Not Found"}``, Ollama's ``404 page not
found``, llama-server's ``File Not Found``) means the endpoint lacks the route. That is
remembered per worker for ``REMEMBER_SECONDS`` (an upgraded endpoint is found again after
that), and the request — which no model has read yet — goes translated. ``count_tokens`` on
such an endpoint is a one-token chat completion whose usage says how long the prompt is. An
endpoint never sees ``previous_response_id``: the balancer has already put that response's
turns into the input (``stored_responses.py``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from .. import errors
from ..dialects import COUNT_TOKENS, MESSAGES, RESPONSES, messages, responses
from ..wire import dumps, loads
from .registry import ENDPOINT
from .upstream import (
    CHAT,
    JSON_HEADERS,
    SSE_HEADERS,
    NodeResponse,
    ProxyRequest,
    error_response,
)

log = logging.getLogger(__name__)

REMEMBER_SECONDS = 600.0
TRANSLATED = frozenset((RESPONSES, MESSAGES, COUNT_TOKENS))


def _missing_route(response: NodeResponse) -> bool:
    if response.status not in (404, 405) or not isinstance(response.body, bytes):
        return False
    return b"model" not in response.body.lower()


class Translator:
    """Sends one request to a member, translating it for an endpoint that lacks its API."""

    def __init__(self) -> None:
        self._lacking: dict[tuple[int, str], float] = {}  # (member id, operation) -> since
        self._lock = threading.Lock()

    def lacks(self, member_id: int, operation: str) -> bool:
        since = self._lacking.get((member_id, operation))
        return since is not None and time.monotonic() - since < REMEMBER_SECONDS

    def send(self, member, request: ProxyRequest) -> NodeResponse:  # noqa: ANN001 - Member
        if member.kind != ENDPOINT or request.operation not in TRANSLATED:
            return member.node.send(request)
        if not self.lacks(member.id, request.operation):
            response = member.node.send(_as_sent_natively(request))
            if not _missing_route(response):
                return response
            response.close()
            with self._lock:
                self._lacking[(member.id, request.operation)] = time.monotonic()
            log.info("Endpoint %s lacks %s: translating to chat completions", member.name,
                     request.path)
        return translated(member.node, request)


def _as_sent_natively(request: ProxyRequest) -> ProxyRequest:
    """Without ``previous_response_id``: this balancer has put that response's turns into
    the input already, and the endpoint's own store knows no such id."""
    if "previous_response_id" not in request.payload:
        return request
    payload = {k: v for k, v in request.payload.items() if k != "previous_response_id"}
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return replace(request, raw=raw, payload=payload)


def translated(node, request: ProxyRequest) -> NodeResponse:  # noqa: ANN001 - a Node
    """The request sent as a chat completion, the answer in the request's API."""
    dialect = responses if request.operation == RESPONSES else messages
    try:
        if request.operation == COUNT_TOKENS:
            chat_body, req = messages.to_chat(request.payload, count_only=True)
            chat_body["max_tokens"] = 1
        else:
            chat_body, req = dialect.to_chat(request.payload)
    except errors.APIError as exc:
        return error_response(exc, request.operation)
    response = node.send(replace(request, operation=CHAT, raw=dumps(chat_body),
                                 payload=chat_body, as_sent=None))
    if response.status >= 400:
        return translated_error(response, request.operation)
    if response.streaming:
        frames = (responses.framed(_chunks(response.body), req) if dialect is responses
                  else messages.framed(_chunks(response.body), req, 0))
        return NodeResponse(response.status, list(SSE_HEADERS), _batched(frames),
                            response.close)
    try:
        answer = loads(response.body)
        if request.operation == COUNT_TOKENS:
            body = {"input_tokens": int(answer["usage"]["prompt_tokens"])}
        else:
            body = dialect.from_chat(answer, req)
    except (ValueError, KeyError, TypeError, IndexError):
        return error_response(errors.unreadable_upstream_answer("chat completion"),
                              request.operation)
    data = dumps(body) + b"\n"
    return NodeResponse(200, list(JSON_HEADERS), data)


def translated_error(response: NodeResponse, operation: str) -> NodeResponse:
    """An upstream's error (chat completions' shape), in the request's API's shape (the
    status and Retry-After kept)."""
    if response.streaming:
        response.close()
        return error_response(errors.relayed(response.status, {}), operation)
    try:
        body = json.loads(response.body)
    except ValueError:
        body = {}
    err = errors.relayed(response.status, body if isinstance(body, dict) else {})
    out = error_response(err, operation)
    return NodeResponse(out.status, out.headers + [(k, v) for k, v in response.headers
                                                   if k.lower() == "retry-after"], out.body)


def _chunks(body: Iterator[bytes]) -> Iterator[dict | None]:
    """The chat completion chunks of an endpoint's stream, those of each read from the network
    followed by None (the translation may send what it has: a fast endpoint's chunks arrive
    many to a read, and each write to the client costs more than translating one); its error
    event, raised."""
    pending = b""
    for data in body:
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            chunk = loads(payload)
            if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                raise errors.relayed(502, chunk)
            if isinstance(chunk, dict):
                yield chunk
        yield None


def _batched(frames: Iterator[bytes | None]) -> Iterator[bytes]:
    """The frames of one read from the network as one write."""
    batch: list[bytes] = []
    for frame in frames:
        if frame is not None:
            batch.append(frame)
        elif batch:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)

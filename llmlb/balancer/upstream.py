"""The node seam: hand a node one OpenAI request, get its answer back as status, headers and
body, the same shape whether the node runs in this process or on another machine.

The wire is the OpenAI API itself: a node is the same app and answers ``/v1/...`` as vLLM or
llama-server do, so the balancer passes the request's bytes to it and its response's bytes
back as they arrive, reading only what it must (the status and headers before the first byte,
for failover). The in-process node runs ``serving/`` directly; a remote node is reached over a
pooled keep-alive connection (``http1``: one pool per node, sized to the worker's threads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from engines.base import CHAT, COMPLETION, EMBEDDINGS

from .. import errors
from ..dispatch import Dispatcher
from ..serving import dialects
from ..serving import openai as serving
from ..serving.openai import DEFAULT_LIMITS
from ..serving.protocol import PromptLimits
from ..serving.sse import SSEStream
from . import http1

log = logging.getLogger(__name__)

PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions",
         EMBEDDINGS: "/v1/embeddings", **dialects.PATHS}
SSE_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
               ("X-Accel-Buffering", "no")]  # nginx: pass each event on at once
JSON_HEADERS = [("Content-Type", "application/json")]
# Hop-by-hop headers, and what only describes the node's own server, never reach the client.
DROPPED_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
    "upgrade", "proxy-authenticate", "proxy-authorization", "date", "server", "set-cookie",
    "x-llmlb-worker", "x-llmlb-node"})


def _noop() -> None:
    return None


@dataclass(frozen=True)
class ProxyRequest:
    """One OpenAI request on its way to a node: the bytes as sent, and what was read of them."""

    operation: str  # CHAT | COMPLETION | EMBEDDINGS | a dialect's (serving/dialects.py)
    raw: bytes
    payload: dict
    model_id: str
    as_sent: ProxyRequest | None = None  # the client's request, when llmlb changed it
    headers: tuple[tuple[str, str], ...] = ()  # the client's, that a hosted provider reads

    @property
    def path(self) -> str:
        return PATHS[self.operation]


@dataclass
class NodeResponse:
    """A node's answer. ``body`` is bytes when complete, else an iterator of chunks as they
    arrive (a stream); ``close`` frees what the answer holds (the model, the connection)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterator[bytes]
    close: Callable[[], None] = _noop

    @property
    def streaming(self) -> bool:
        return not isinstance(self.body, bytes)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


class NodeUnreachable(Exception):
    """The node could not be asked, or stopped answering; the message says how."""


class Node(Protocol):
    name: str

    def send(self, request: ProxyRequest) -> NodeResponse: ...


def json_response(status: int, body: dict, headers: dict[str, str] | None = None,
                  ) -> NodeResponse:
    data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
    return NodeResponse(status, JSON_HEADERS + list((headers or {}).items()), data)


def error_response(err: errors.APIError, operation: str = CHAT) -> NodeResponse:
    return json_response(err.status, dialects.error_body(operation, err), err.headers)


# --- the node in this process ---------------------------------------------------------------

_SERVE = {CHAT: serving.chat_completion, COMPLETION: serving.completion,
          EMBEDDINGS: serving.embeddings, **dialects.SERVE}


def _encoded(stream: SSEStream) -> Iterator[bytes]:
    for frame in stream:
        yield frame.encode()


class InProcessNode:
    """Runs requests on this process's engines (standalone, and a node serving its balancer);
    prompts over ``limits`` are refused before anything tokenizes them."""

    def __init__(self, name: str, dispatcher: Dispatcher,
                 limits: PromptLimits = DEFAULT_LIMITS) -> None:
        self.name = name
        self.dispatcher = dispatcher
        self.limits = limits

    def send(self, request: ProxyRequest) -> NodeResponse:
        try:
            result = _SERVE[request.operation](self.dispatcher, request.payload, self.limits)
        except Exception as exc:
            err = errors.from_exception(exc)
            if err.code == "internal_error":
                log.exception("Unhandled error serving %s", request.path)
            return error_response(err, request.operation)
        if isinstance(result, SSEStream):
            return NodeResponse(200, list(SSE_HEADERS), _encoded(result), result.close)
        return json_response(200, result)


# --- a node on another machine ----------------------------------------------------------------

class RemoteNode:
    """A node reached over HTTP with the secret it gave at registration."""

    def __init__(self, name: str, url: str, secret: str | None, *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.name, self.url = name, url
        self.pool = http1.Pool(url, maxsize=pool_size, connect_timeout=connect_timeout,
                               read_timeout=read_timeout)
        self.base_path = self.base_path_of(url)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if secret:
            self.headers["Authorization"] = f"Bearer {secret}"

    @staticmethod
    def base_path_of(url: str) -> str:
        """The path prefix of ``/v1/...`` requests: an OpenAI base URL often ends in /v1
        (vLLM, llama-server, hosted APIs), and the paths sent already start with it."""
        return urlsplit(url).path.rstrip("/").removesuffix("/v1")

    def close(self) -> None:
        self.pool.close()

    def request(self, method: str, path: str, body: bytes | None = None) -> http1.Response:
        """Send a request and return once the status and headers are in (the body unread)."""
        try:
            return self.pool.request(method, self.base_path + path, body, self.headers)
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"node {self.name}: {exc}") from exc

    def send(self, request: ProxyRequest) -> NodeResponse:
        response = self.request("POST", request.path, request.raw)
        headers = [(k, v) for k, v in response.headers if k.lower() not in DROPPED_HEADERS]
        streamed = (response.header("Content-Type") or "").startswith("text/event-stream")
        if not streamed or response.status >= 300:
            try:  # an answer or an error is small: read it whole, so a cut is still a failover
                data = response.read()
            except http1.HTTPClientError as exc:
                raise NodeUnreachable(f"node {self.name}: {exc}") from exc
            return NodeResponse(response.status, headers, data)
        return NodeResponse(response.status, headers, self._chunks(response), response.close)

    def _chunks(self, response: http1.Response) -> Iterator[bytes]:
        """The stream's bytes as the node sends them."""
        try:
            yield from response.chunks()
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"node {self.name}: {exc}") from exc

"""The node seam: hand a node one OpenAI request, get its answer back as status, headers and
body, the same shape whether the node runs in this process or on another machine.

The wire is the OpenAI API itself: a node is the same app and answers ``/v1/...`` as vLLM or
llama-server do, so the balancer passes the request's bytes to it and its response's bytes
back as they arrive, reading only what it must (the status and headers before the first byte,
for failover). A remote node is reached over a pooled keep-alive connection (``http1``: one
pool per node, sized to the worker's threads); the node in this process
(``node/transport.py``) runs ``serving/`` directly behind the same ``send``.

The operations the balancer forwards, and the path of each, are ``PATHS``: a new dialect is a
new operation there, a route, and the node's serving of it.

Of a remote member's headers only those that belong to the answer reach the client
(``PASSED_HEADERS``): never its security policy, framing rules, CORS, cookies or redirects,
which would speak for llmlb's origin (SC-8). An answer that is neither JSON nor an event
stream (a proxy's HTML error page) becomes llmlb's own 502 ``upstream_error``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .. import dialects, errors, urls
from ..disconnect import ClientLeft, ClientWatch
from . import http1

log = logging.getLogger(__name__)

CHAT, COMPLETION, EMBEDDINGS = "chat", "completion", "embeddings"  # the operations forwarded
PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions",
         EMBEDDINGS: "/v1/embeddings", **dialects.PATHS}
SSE_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
               ("X-Accel-Buffering", "no")]  # nginx: pass each event on at once
JSON_HEADERS = [("Content-Type", "application/json")]
# What of a remote member's answer reaches the client: its body's type and encoding, caching,
# retry hints (the SDKs read Retry-After, retry-after-ms, x-should-retry), request ids and the
# providers' rate-limit and version headers. Anything else (hop-by-hop headers, its server,
# cookies, Location, CORS, Content-Security-Policy, X-Frame-Options…) stays behind.
PASSED_HEADERS = frozenset({
    "content-type", "content-encoding", "cache-control", "retry-after", "retry-after-ms",
    "x-should-retry", "x-request-id", "request-id", "x-accel-buffering"})
PASSED_PREFIXES = ("openai-", "x-ratelimit-", "anthropic-")


def passed_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if _passes(k)]


@functools.lru_cache(maxsize=1024)  # the same few names on every answer (bounded: an
def _passes(name: str) -> bool:      # upstream may send any)
    low = name.lower()
    return low in PASSED_HEADERS or low.startswith(PASSED_PREFIXES)


def media_type_of(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(media_type: str, body: bytes) -> bool:
    if media_type == "application/json" or media_type.endswith("+json"):
        return True
    if media_type:
        return False
    try:  # no Content-Type at all: JSON if it parses (rare; the body is small)
        json.loads(body)
    except ValueError:
        return False
    return True


def _noop() -> None:
    return None


@functools.lru_cache(maxsize=1024)  # the API's few paths per member, each worked out once
def _path(url: str, endpoint: bool, path: str) -> str:
    return urls.endpoint_path(url, path) if endpoint else urls.node_path(url, path)


@dataclass(eq=False)  # not frozen (one per request; a frozen init costs three times as much),
class ProxyRequest:   # yet never changed once made: ``dataclasses.replace`` makes another
    """One OpenAI request on its way to a node: the bytes as sent, and what was read of them.

    ``model_id`` was checked once, where the request came in, and travels down as it is.
    ``found`` is what members found when they looked for the model on their own disk, kept by
    whoever looked: the in-process node reads its disk once per request, whether the balancer
    asks it if it has the model ready, if this host has the files, or to run it.
    ``id_refusal``: the model is an endpoint's own id (Ollama's ``llama3.2:1b``) that no llmlb
    node can hold; what llmlb's own node answers for it."""

    operation: str  # CHAT | COMPLETION | EMBEDDINGS | a dialect's (``dialects.PATHS``)
    raw: bytes
    payload: dict
    model_id: str
    as_sent: ProxyRequest | None = None  # the client's request, when llmlb changed it
    found: dict[object, object] = field(default_factory=dict, compare=False, repr=False)
    id_refusal: errors.APIError | None = None
    headers: tuple[tuple[str, str], ...] = ()  # the client's, that a hosted provider reads
    #: the client's connection: an answer not yet begun stops when it leaves
    client: ClientWatch | None = field(default=None, compare=False, repr=False)

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
    """An error as a node answers it, in the shape of the operation's API."""
    return json_response(err.status, dialects.error_body(operation, err), err.headers)


# --- a node on another machine ----------------------------------------------------------------

class RemoteNode:
    """A node reached over HTTP with the secret it gave at registration, or an endpoint with
    its API key; ``endpoint`` says which, and so where the OpenAI routes are (``urls``)."""

    def __init__(self, name: str, url: str, secret: str | None, *, endpoint: bool = False,
                 pool_size: int, connect_timeout: float, read_timeout: float) -> None:
        self.name, self.url, self.endpoint = name, url, endpoint
        self.kind = "endpoint" if endpoint else "node"
        self.pool = http1.Pool(url, maxsize=pool_size, connect_timeout=connect_timeout,
                               read_timeout=read_timeout)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if secret:
            self.headers["Authorization"] = f"Bearer {secret}"

    def path(self, path: str) -> str:
        """The path to ask for ``path`` (``/v1/chat/completions``, ``/v0/node/report``)."""
        return _path(self.url, self.endpoint, path)

    def close(self) -> None:
        self.pool.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                client: ClientWatch | None = None) -> http1.Response:
        """Send a request and return once the status and headers are in (the body unread);
        ``client``: drop the connection and raise ClientLeft if it leaves first."""
        try:
            return self.pool.request(method, self.path(path), body, self.headers,
                                     client.sock if client is not None else None)
        except http1.ClientGone:
            raise ClientLeft() from None
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"{self.kind} {self.name}: {exc}") from exc

    def send(self, request: ProxyRequest) -> NodeResponse:
        # A stream's headers come at once; a whole answer's only when it is done.
        client = None if request.payload.get("stream") else request.client
        try:
            response = self.request("POST", request.path, request.raw, client)
        except ClientLeft:
            return error_response(errors.client_closed())
        headers = passed_headers(response.headers)
        media_type = media_type_of(response.header("Content-Type"))
        if media_type != "text/event-stream" or response.status >= 300:
            try:  # an answer or an error is small: read it whole, so a cut is still a failover
                data = response.read()
            except http1.HTTPClientError as exc:
                raise NodeUnreachable(f"{self.kind} {self.name}: {exc}") from exc
            if not is_json(media_type, data):
                return error_response(errors.upstream_not_json(
                    self.kind, self.name, response.status, media_type), request.operation)
            return NodeResponse(response.status, headers, data)
        return NodeResponse(response.status, headers, self._chunks(response), response.close)

    def _chunks(self, response: http1.Response) -> Iterator[bytes]:
        """The stream's bytes as the node sends them."""
        try:
            yield from response.chunks()
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"{self.kind} {self.name}: {exc}") from exc

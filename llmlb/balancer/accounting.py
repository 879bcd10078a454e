"""What the balancer notes about each request it forwards (LB-6): status, node, latency, time
to the first byte, tokens, handed to ``on_done`` as one ``RequestRecord`` (metrics and
history) when the answer ends.

Tokens come from the answer's ``usage`` (in any of the three APIs), found without decoding
the answer: a regular expression over the bytes of a complete answer, or over the last events
of a stream. A chat stream's usage exists only when the client asks for it
(``stream_options.include_usage``);
when it did not, the balancer asks on its behalf (``with_usage``) and removes that extra
event (``choices: []`` with ``usage``) from what the client gets, so the client sees the
stream it asked for.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from ..history import RequestRecord
from ..limiter import Ticket
from .upstream import CHAT, COMPLETION, NodeResponse, ProxyRequest

# Chat's names, and the Responses and Messages APIs' (whose streams end with their usage too).
_PROMPT = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
# With include_usage, every chunk carries ``"usage": null`` (OpenAI's shape); a client that did
# not ask for usage must not see it.
_NULL_USAGE = re.compile(rb',\s*"usage":\s*null')
_USAGE = b'"usage"'
TAIL_BYTES = 8192  # a stream's usage event is among its last bytes
CLIENT_LEFT = 499  # nginx's code for a client that closed the connection first


def usage_of(data: bytes) -> tuple[int | None, int | None]:
    at = data.rfind(_USAGE)
    if at < 0:
        return None, None
    prompt, completion = _PROMPT.search(data, at), _COMPLETION.search(data, at)
    return (int(prompt.group(1)) if prompt else None,
            int(completion.group(1)) if completion else None)


def with_usage(request: ProxyRequest) -> tuple[ProxyRequest, bool]:
    """The request asking for a stream's usage; True when that was added here."""
    payload = request.payload
    if request.operation not in (CHAT, COMPLETION) or payload.get("stream") is not True:
        return request, False
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return request, False
    if options is not None and not isinstance(options, dict):
        return request, False  # invalid: the node says so
    payload = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return replace(request, raw=raw, payload=payload, as_sent=request), True


class Watch:
    """One request, from arrival to the end of its answer."""

    def __init__(self, operation: str, key_name: str | None,
                 on_done: Callable[[RequestRecord], None]) -> None:
        self.operation, self.key_name, self.on_done = operation, key_name, on_done
        self.at, self.started = time.time(), time.perf_counter()
        self.model: str | None = None
        self.strip_usage = False
        self.ticket: Ticket | None = None  # a limited key's admission, given back at the end
        self._done = False

    def failed(self, status: int, code: str | None, node: str | None = None) -> None:
        """The request ended in an error of the balancer's own (no node answered it)."""
        self._finish(status, node, False, None, None, None, code)

    def answered(self, node: str | None, response: NodeResponse) -> NodeResponse:
        """The node's answer, watched to its end."""
        if isinstance(response.body, bytes):
            tokens = usage_of(response.body) if response.status < 400 else (None, None)
            self._finish(response.status, node, False, None, *tokens,
                         _error_code(response.body) if response.status >= 400 else None)
            return response
        body = _Watched(self._stream(node, response.status, response.body),
                        lambda: self._finish(CLIENT_LEFT, node, True, None, None, None,
                                             "client_left"))
        return NodeResponse(response.status, response.headers, body, response.close)

    def _stream(self, node: str | None, status: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
        ttft = None
        head = tail = b""  # head: Anthropic's message_start, with the prompt's tokens
        pending = b""
        usage: tuple[int | None, int | None] = (None, None)
        ended = False
        try:
            for chunk in chunks:
                if ttft is None:
                    ttft = time.perf_counter() - self.started
                    head = chunk[:TAIL_BYTES]
                if self.strip_usage:
                    chunk, pending, found = _without_usage_event(pending + chunk)
                    if found is not None:
                        usage = found
                    if not chunk:
                        continue
                tail = (tail + chunk)[-TAIL_BYTES:]
                yield chunk
            if pending:  # a stream that did not end with a blank line
                rest, pending = pending, b""
                tail = (tail + rest)[-TAIL_BYTES:]
                yield rest
            ended = True
        finally:
            if not self.strip_usage:
                usage = usage_of(tail)
                if usage[0] is None:  # the last usage (a Messages stream's) without it
                    usage = (usage_of(head)[0], usage[1])
            broke = b'"code":"node_failed"' in tail[-2048:]
            final = CLIENT_LEFT if not ended else 502 if broke else status
            self._finish(final, node, True, ttft, *usage,
                         "client_left" if not ended else "node_failed" if broke else None)

    def _finish(self, status: int, node: str | None, stream: bool, ttft: float | None,
                tokens_in: int | None, tokens_out: int | None, error: str | None) -> None:
        if self._done:
            return
        self._done = True
        latency = time.perf_counter() - self.started
        try:
            self.on_done(RequestRecord(self.at, self.key_name, self.operation, self.model, node,
                                       status, stream, latency, ttft if stream else latency,
                                       tokens_in, tokens_out, error))
        finally:
            if self.ticket is not None:
                self.ticket.finish((tokens_in or 0) + (tokens_out or 0))


class _Watched:
    """A watched stream; closed before anyone iterated it (the client left before the first
    byte), it still counts: a generator that never started skips its ``finally``."""

    def __init__(self, chunks: Iterator[bytes], never_started: Callable[[], None]) -> None:
        self._chunks, self._never_started = chunks, never_started
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        self._started = True
        return self._chunks

    def __next__(self) -> bytes:
        self._started = True
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]
        if not self._started:
            self._never_started()


def _without_usage_event(data: bytes) -> tuple[bytes, bytes, tuple[int | None, int | None] | None]:
    """(complete events to pass on, the incomplete rest, the usage of a removed usage event)."""
    cut = data.rfind(b"\n\n")
    if cut < 0:
        return b"", data, None
    complete, rest = data[:cut + 2], data[cut + 2:]
    if _USAGE not in complete:
        return complete, rest, None
    kept, found = [], None
    for event in complete.split(b"\n\n")[:-1]:
        if _USAGE in event and _EMPTY_CHOICES.search(event):
            found = usage_of(event)
            continue
        kept.append(_NULL_USAGE.sub(b"", event) + b"\n\n")
    return b"".join(kept), rest, found


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
        return str(error.get("code") or error.get("type")) if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None

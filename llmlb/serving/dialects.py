"""The APIs besides chat completions that llmlb speaks, as operations of the balancer: their
paths, how a node serves them, and how their streams end and report an error — what the
balancer and the node need to treat them as they treat chat completions.

A node frames every dialect itself (``responses.serve``, ``messages.serve``), so the balancer
passes its bytes through; it reads only whether a stream ended properly and, when a node
broke off, ends the stream with an error event in the dialect's own shape.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import errors
from . import messages, responses
from .sse import event

RESPONSES, MESSAGES, COUNT_TOKENS = "responses", "messages", "count_tokens"
PATHS = {RESPONSES: "/v1/responses", MESSAGES: "/v1/messages",
         COUNT_TOKENS: "/v1/messages/count_tokens"}
SERVE: dict[str, Callable] = {RESPONSES: responses.serve, MESSAGES: messages.serve,
                              COUNT_TOKENS: messages.count_tokens}
ANTHROPIC = (MESSAGES, COUNT_TOKENS)
DONE = b"data: [DONE]\n\n"


def error_body(operation: str, err: errors.APIError) -> dict:
    """An error answered instead of a response, in the operation's API's shape."""
    return err.anthropic_body() if operation in ANTHROPIC else err.body()


def stream_ended(operation: str, tail: bytes) -> bool:
    """Whether the last bytes of a stream end it properly (not a node that broke off)."""
    if operation == RESPONSES:
        return responses.stream_ended(tail)
    if operation == MESSAGES:
        return messages.stream_ended(tail)
    return tail.rstrip().endswith(b"[DONE]")


def stream_error(operation: str, err: errors.APIError) -> bytes:
    """The last event of a stream that a node broke off."""
    if operation == RESPONSES:
        return responses.error_event(err).encode()
    if operation == MESSAGES:
        return messages.error_event(err).encode()
    return event(err.body()).encode() + DONE

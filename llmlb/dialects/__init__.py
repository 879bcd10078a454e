"""The APIs llmlb speaks besides chat completions, as pure conversions to and from chat
completions, its internal form: OpenAI's Responses API (``responses``), Anthropic's Messages
API (``messages``; and the other way round, llmlb as Anthropic's client:
``messages_upstream``), Google's Gemini API as a hosted provider speaks it (``gemini``).
Free of Flask, of the node and of the balancer, so both use them: a node frames every dialect
itself (``serving/agents.py``) and the balancer passes its bytes through; only an endpoint
that lacks a dialect, or a hosted provider that speaks another, gets the balancer's
translation (``balancer/translate.py``, ``balancer/providers.py``).

Here also what the balancer needs to treat these APIs as it treats chat completions: each
operation's path, its errors' shape, and how its streams end and report an error.
"""

from __future__ import annotations

from .. import errors
from ..wire import DONE, event
from . import messages, responses

RESPONSES, MESSAGES, COUNT_TOKENS = "responses", "messages", "count_tokens"
PATHS = {RESPONSES: "/v1/responses", MESSAGES: "/v1/messages",
         COUNT_TOKENS: "/v1/messages/count_tokens"}
ANTHROPIC = (MESSAGES, COUNT_TOKENS)


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
        return responses.error_event(err)
    if operation == MESSAGES:
        return messages.error_event(err)
    return (event(err.body()) + DONE).encode()

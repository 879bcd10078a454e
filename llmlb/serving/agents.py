"""A node serving the Responses and Messages APIs (AG-1, AG-2): each request converted to a
chat completion (``dialects/``), run on the chat path (``serving/openai.py``), and the answer,
or the stream event by event, converted back. A chat error about a field names it as the
client's API does. The node's dispatch (``node/transport.py``) holds these beside chat."""

from __future__ import annotations

from .. import errors
from ..dialects import messages, responses
from ..disconnect import ClientWatch
from . import openai as chat
from .inference import Runner
from .protocol import PromptLimits
from .sse import EventStream, SSEStream


def serve_responses(runner: Runner, body: dict, model: str, limits: PromptLimits,
                    client: ClientWatch | None = None) -> dict | SSEStream:
    chat_body, req = responses.to_chat(body)
    try:
        result = chat.chat_completion(runner, chat_body, model, limits, client)
    except errors.APIError as exc:
        raise messages.renamed(exc, responses.PARAMS) from None
    if isinstance(result, SSEStream):
        return EventStream(responses.framed(iter(result.chunks()), req), result.close)
    return responses.from_chat(result, req)


def serve_messages(runner: Runner, body: dict, model: str, limits: PromptLimits,
                   client: ClientWatch | None = None) -> dict | SSEStream:
    chat_body, req = messages.to_chat(body)
    try:
        result = chat.chat_completion(runner, chat_body, model, limits, client)
    except errors.APIError as exc:
        raise messages.renamed(exc, messages.PARAMS) from None
    if isinstance(result, SSEStream):
        prompt = (result.usage() if result.usage else {}).get("prompt_tokens", 0)
        return EventStream(messages.framed(iter(result.chunks()), req, prompt), result.close)
    return messages.from_chat(result, req)


def count_tokens(runner: Runner, body: dict, model: str, limits: PromptLimits,
                 client: ClientWatch | None = None) -> dict:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the model reads them."""
    chat_body, _ = messages.to_chat(body, count_only=True)
    try:
        return {"input_tokens": chat.prompt_tokens(runner, chat_body, model, limits)}
    except errors.APIError as exc:
        raise messages.renamed(exc, messages.PARAMS) from None

"""The OpenAI endpoints' logic, free of Flask: validate, dispatch, shape the response.

Each function takes the JSON body and returns either a dict (the response) or an iterator of
SSE strings (a stream). Streams are primed before they are returned, so a request that cannot
start (unknown model, busy model, prompt too long) is an ordinary JSON error, not a broken
stream.
"""

from __future__ import annotations

import base64
import itertools
import struct
import time
import uuid
from collections.abc import Iterator

from engines.base import CHAT, COMPLETION, EMBEDDINGS, SamplingParams

from .. import errors
from ..dispatch import Dispatcher
from ..node import Generation, InferenceCall
from ..storage import requested_model_id
from . import protocol
from .sse import SSEStream
from .textstream import TextStream

DEFAULT_LIMITS = protocol.PromptLimits()


def _params(req: protocol.ChatRequest | protocol.CompletionRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.token_limit,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
    )


def _start(dispatcher: Dispatcher, call: InferenceCall, stops: list[str]) -> TextStream:
    generation = dispatcher.dispatch(call)
    assert isinstance(generation, Generation)
    events = iter(generation)
    try:
        first = next(events)  # runs the prompt: errors surface before any response is sent
    except StopIteration:
        first = None
    except BaseException:
        generation.close()
        raise
    chained = itertools.chain([first] if first is not None else [], events)
    return TextStream(chained, stops, on_close=generation.close)


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


# --- chat -------------------------------------------------------------------------------------

def chat_completion(dispatcher: Dispatcher, body: dict,
                    limits: protocol.PromptLimits = DEFAULT_LIMITS) -> dict | SSEStream:
    limits.check_messages(body)
    req = protocol.parse(protocol.ChatRequest, body)
    limits.check_chars(protocol.chat_texts(req), "messages")
    model = requested_model_id(req.model)
    call = InferenceCall(CHAT, model, messages=[m.model_dump(exclude_none=True)
                                                for m in req.messages], params=_params(req))
    stream = _start(dispatcher, call, req.stops)
    completion_id, created = _ids("chatcmpl")
    if req.stream:
        return SSEStream(_chat_chunks(stream, completion_id, created, model, req.include_usage),
                         stream.close)
    text = "".join(stream)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": stream.finish_reason or "stop"}],
        "usage": stream.usage,
    }


def _chat_chunks(stream: TextStream, cid: str, created: int, model: str,
                 include_usage: bool) -> Iterator[dict]:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    yield chunk({"role": "assistant", "content": ""})
    for text in stream:
        yield chunk({"content": text})
    yield chunk({}, stream.finish_reason or "stop")
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [], "usage": stream.usage}


# --- completions ------------------------------------------------------------------------------

def completion(dispatcher: Dispatcher, body: dict,
               limits: protocol.PromptLimits = DEFAULT_LIMITS) -> dict | SSEStream:
    req = protocol.parse(protocol.CompletionRequest, body)
    limits.check_chars([req.prompt_text], "prompt")
    model = requested_model_id(req.model)
    if req.echo:
        raise errors.invalid_request("echo is not supported", "echo")
    call = InferenceCall(COMPLETION, model, prompt=req.prompt_text, params=_params(req))
    stream = _start(dispatcher, call, req.stops)
    completion_id, created = _ids("cmpl")
    if req.stream:
        return SSEStream(_completion_chunks(stream, completion_id, created, model,
                                            req.include_usage), stream.close)
    text = "".join(stream)
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": stream.finish_reason or "stop"}],
        "usage": stream.usage,
    }


def _completion_chunks(stream: TextStream, cid: str, created: int, model: str,
                       include_usage: bool) -> Iterator[dict]:
    def chunk(text: str, finish: str | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": None,
                            "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    for text in stream:
        yield chunk(text)
    yield chunk("", stream.finish_reason or "stop")
    if include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": stream.usage}


# --- embeddings -------------------------------------------------------------------------------

def embeddings(dispatcher: Dispatcher, body: dict,
               limits: protocol.PromptLimits = DEFAULT_LIMITS) -> dict:
    req = protocol.parse(protocol.EmbeddingRequest, body)
    limits.check_chars(req.texts, "input")
    model = requested_model_id(req.model)
    result = dispatcher.dispatch(InferenceCall(EMBEDDINGS, model, texts=req.texts))
    assert isinstance(result, tuple)
    vectors, tokens = result
    as_base64 = req.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": _b64(v) if as_base64 else v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

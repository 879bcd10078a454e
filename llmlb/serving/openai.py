"""The OpenAI endpoints' logic, free of Flask: validate, run, shape the response.

Each function takes the ``Runner`` that runs the model, the JSON body and the model id as
checked where the request came in, and returns either a dict (the response) or an iterator of
SSE strings (a stream). Streams are primed before they are returned, so a request that cannot
start (unknown model, busy model, prompt too long) is an ordinary JSON error, not a broken
stream.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
import time
import uuid
from collections.abc import Iterator

from engines.base import CHAT, COMPLETION, EMBEDDINGS, SamplingParams, Started, TopLogprob

from .. import errors
from ..disconnect import ClientWatch
from . import protocol, tools
from .inference import InferenceCall, Runner
from .sse import SSEStream
from .textstream import TextStream

DEFAULT_LIMITS = protocol.PromptLimits()


def _params(req: protocol.ChatRequest | protocol.CompletionRequest, *,
            json_schema: dict | None = None, tools: tuple[dict, ...] = (),
            top_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.token_limit,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items()),
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        json_schema=None if json_schema is None else json.dumps(json_schema),
        top_logprobs=top_logprobs,
        tools=tools,
    )


def _start(runner: Runner, call: InferenceCall, stops: list[str],
           client: ClientWatch | None = None) -> TextStream:
    """The generation, its first event read; ``client``: stop when it leaves (for answers
    that write nothing before the end: a stream notices at its next write)."""
    generation = runner.generate(call)
    events = iter(generation)
    try:
        first = next(events)  # runs the prompt: errors surface before any response is sent
    except StopIteration:
        first = None
    except BaseException:
        generation.close()
        raise
    chained = itertools.chain([first] if first is not None else [], events)
    stream = TextStream(chained, stops, on_close=generation.close,
                        check=client.check if client is not None else None)
    if isinstance(first, Started):  # known before the first token (a dialect reports it)
        stream.prompt_tokens = first.prompt_tokens
    return stream


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


# --- chat -------------------------------------------------------------------------------------

def _chat_call(body: dict, model: str, limits: protocol.PromptLimits,
               ) -> tuple[protocol.ChatRequest, tools.OutputPlan, InferenceCall]:
    limits.check_messages(body)
    req = protocol.parse(protocol.ChatRequest, body)
    limits.check_chars(protocol.chat_texts(req), "messages")
    output = tools.plan(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise errors.invalid_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, json_schema=output.json_schema, tools=output.tools, top_logprobs=top)
    return req, output, InferenceCall(CHAT, model, messages=tools.template_messages(req),
                                      params=params)


def chat_completion(runner: Runner, body: dict, model: str,
                    limits: protocol.PromptLimits = DEFAULT_LIMITS,
                    client: ClientWatch | None = None) -> dict | SSEStream:
    req, output, call = _chat_call(body, model, limits)
    stream = _start(runner, call, req.stops, None if req.stream else client)
    completion_id, created = _ids("chatcmpl")
    if req.stream:
        chunks = _chat_chunks(stream, output, bool(req.logprobs))
        return SSEStream(_framed(chunks, completion_id, created, model, req.include_usage,
                                 stream), stream.close, lambda: stream.usage)
    text = "".join(stream)
    content, calls = tools.read_calls(output, text)
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message,
              "logprobs": _chat_logprobs(stream) if req.logprobs else None,
              "finish_reason": _finish(stream, bool(calls))}
    if stream.stop_sequence is not None:  # which one, as vLLM says it
        choice["stop_reason"] = stream.stop_sequence
    return {"id": completion_id, "object": "chat.completion", "created": created,
            "model": model, "choices": [choice], "usage": stream.usage}


def prompt_tokens(runner: Runner, body: dict, model: str,
                  limits: protocol.PromptLimits = DEFAULT_LIMITS) -> int:
    """How many tokens a chat request's prompt has (template and tools included), without
    generating: the engine counts the prompt when it starts, and closing it stops it."""
    _, _, call = _chat_call({**body, "stream": False}, model, limits)
    stream = _start(runner, call, [])
    stream.close()
    return stream.prompt_tokens


def _finish(stream: TextStream, called: bool) -> str:
    reason = stream.finish_reason or "stop"
    return "tool_calls" if called and reason == "stop" else reason


def _chat_logprobs(stream: TextStream) -> dict:
    def entry(item: TopLogprob) -> dict:
        return {"token": item.token, "logprob": item.logprob, "bytes": list(item.bytes)}

    return {"content": [{**entry(lp.chosen), "top_logprobs": [entry(t) for t in lp.top]}
                        for lp in stream.drain_logprobs()], "refusal": None}


def _framed(choices: Iterator[tuple[dict, str | None, dict | None]], cid: str, created: int,
            model: str, include_usage: bool, stream: TextStream) -> Iterator[dict]:
    """``chat.completion.chunk`` objects around each (delta, finish_reason, logprobs)."""
    for delta, finish, logprobs in choices:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None and stream.stop_sequence is not None:
            choice["stop_reason"] = stream.stop_sequence
        out = {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        yield out
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created,
               "model": model, "choices": [], "usage": stream.usage}


def _chat_chunks(stream: TextStream, output: tools.OutputPlan,
                 logprobs: bool) -> Iterator[tuple[dict, str | None, dict | None]]:
    def lp() -> dict | None:
        return _chat_logprobs(stream) if logprobs else None

    yield {"role": "assistant", "content": "" if output.mode != tools.NAMED else None}, None, None
    if output.mode == tools.NAMED:  # the arguments stream as they are generated
        yield {"tool_calls": [tools.tool_call(output.function or "", "", index=0)]}, None, None
        for text in stream:
            yield {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}, None, lp()
        yield {}, _finish(stream, True), None
        return
    if not output.calls_tools:
        for text in stream:
            yield {"content": text}, None, lp()
        yield {}, stream.finish_reason or "stop", None
        return
    # REQUIRED and AUTO: text that may be a call is held back until the end
    full, sent = "", 0
    for text in stream:
        full += text
        cut = 0 if output.mode == tools.REQUIRED else tools.may_hold_call(full)
        if cut > sent:
            yield {"content": full[sent:cut]}, None, lp()
            sent = cut
    content, calls = tools.read_calls(output, full)
    if not calls:
        if full[sent:]:
            yield {"content": full[sent:]}, None, lp()
    else:
        for i, call in enumerate(calls):
            yield {"tool_calls": [{"index": i, **call}]}, None, lp() if i == 0 else None
    yield {}, _finish(stream, bool(calls)), None


# --- completions ------------------------------------------------------------------------------

def completion(runner: Runner, body: dict, model: str,
               limits: protocol.PromptLimits = DEFAULT_LIMITS,
               client: ClientWatch | None = None) -> dict | SSEStream:
    req = protocol.parse(protocol.CompletionRequest, body)
    limits.check_chars([req.prompt_text], "prompt")
    if req.echo:
        raise errors.invalid_request("echo is not supported", "echo")
    call = InferenceCall(COMPLETION, model, prompt=req.prompt_text,
                         params=_params(req, top_logprobs=req.logprobs))
    stream = _start(runner, call, req.stops, None if req.stream else client)
    completion_id, created = _ids("cmpl")
    want_logprobs = req.logprobs is not None
    if req.stream:
        return SSEStream(_completion_chunks(stream, completion_id, created, model,
                                            req.include_usage, want_logprobs), stream.close)
    text = "".join(stream)
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text,
                     "logprobs": _completion_logprobs(stream, 0) if want_logprobs else None,
                     "finish_reason": stream.finish_reason or "stop"}],
        "usage": stream.usage,
    }


def _completion_logprobs(stream: TextStream, offset: int) -> dict:
    """The legacy completions shape; ``offset``: characters of text before these tokens."""
    items = stream.drain_logprobs()
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.chosen.token)
    return {"tokens": [lp.chosen.token for lp in items],
            "token_logprobs": [lp.chosen.logprob for lp in items],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in items],
            "text_offset": offsets}


def _completion_chunks(stream: TextStream, cid: str, created: int, model: str,
                       include_usage: bool, logprobs: bool) -> Iterator[dict]:
    def chunk(text: str, finish: str | None = None, lp: dict | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": lp,
                            "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    offset = 0
    for text in stream:
        yield chunk(text, lp=_completion_logprobs(stream, offset) if logprobs else None)
        offset += len(text)
    yield chunk("", stream.finish_reason or "stop")
    if include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": model,
               "choices": [], "usage": stream.usage}


# --- embeddings -------------------------------------------------------------------------------

def embeddings(runner: Runner, body: dict, model: str,
               limits: protocol.PromptLimits = DEFAULT_LIMITS,
               client: ClientWatch | None = None) -> dict:
    req = protocol.parse(protocol.EmbeddingRequest, body)
    limits.check_chars(req.texts, "input")
    vectors, tokens = runner.embed(InferenceCall(EMBEDDINGS, model, texts=req.texts))
    as_base64 = req.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": _b64(v) if as_base64 else v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

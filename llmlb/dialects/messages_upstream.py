"""Anthropic's Messages API the other way round (``messages.py`` serves it; this module, kept
apart only for size, speaks it): llmlb as a client of Anthropic (AG-4, ``anthropic:<model>``).
A chat completion request out as a Messages request, Anthropic's answer back as a chat
completion, and its stream (``message_start`` … ``message_stop``) back as chat completion
chunks. The Responses API reaches Anthropic through chat completions (``responses.py``).
Pure functions.

Mapping choices: system and developer messages join ``system``; an assistant's
``tool_calls`` become ``tool_use`` blocks (their ids kept, so results find them); ``tool``
messages become ``tool_result`` blocks of one user turn; consecutive turns of one role join,
as Anthropic wants them to alternate. ``max_tokens`` is required by Anthropic: a request
without a limit gets ``DEFAULT_MAX_TOKENS``. ``tool_choice`` ``required`` is ``any``, and
``parallel_tool_calls: false`` is ``disable_parallel_tool_use``; a JSON schema output is
``output_config.format``. Thinking blocks are not part of a chat answer. What Anthropic has
no equivalent of (``logprobs``, ``logit_bias``, penalties, ``seed``, ``n`` > 1, a JSON object
without a schema) is a 400 naming the parameter, as on llmlb's own models.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from .. import errors
from .turns import add_turn, some_turns

DEFAULT_MAX_TOKENS = 4096
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
          "max_tokens": "length", "model_context_window_exceeded": "length",
          "tool_use": "tool_calls", "refusal": "content_filter"}
UNSUPPORTED = {"logprobs": "Anthropic returns no log probabilities",
               "top_logprobs": "Anthropic returns no log probabilities",
               "logit_bias": "Anthropic has no logit bias",
               "frequency_penalty": "Anthropic has no frequency penalty",
               "presence_penalty": "Anthropic has no presence penalty",
               "seed": "Anthropic takes no seed", "functions": "use 'tools'",
               "audio": "Anthropic has no audio output"}


@dataclass
class Call:
    """What the answer needs to know of the request it answers."""

    model: str
    stream: bool = False
    include_usage: bool = False


# --- the request ------------------------------------------------------------------------------

def _blocks(content: object, param: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise errors.invalid_request(f"Invalid value for '{param}': a string or a list of "
                                     "content parts", param)
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            url = str(part["image_url"].get("url") or "")
            head, _, data = url.partition(",")
            if head.startswith("data:") and head.endswith(";base64") and data:
                source = {"type": "base64", "media_type": head[5:-7], "data": data}
            elif url.startswith(("https://", "http://")):
                source = {"type": "url", "url": url}
            else:
                raise errors.invalid_request(f"Invalid value for '{param}[{j}].image_url.url'",
                                             f"{param}[{j}].image_url.url")
            blocks.append({"type": "image", "source": source})
        else:
            raise errors.invalid_request(f"Invalid value for '{param}[{j}]': a text or "
                                         "image_url part", f"{param}[{j}]")
    return blocks


def _tool_use(call: object, param: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise errors.missing_parameter(f"{param}.function.name")
    arguments = function.get("arguments") or "{}"
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise errors.invalid_request(f"Invalid value for '{param}.function.arguments': a JSON "
                                     "object", f"{param}.function.arguments") from None
    return {"type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
            "name": function["name"], "input": value if isinstance(value, dict) else {}}


def _turns(messages: object, system: list[str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise errors.invalid_request("Invalid value for 'messages': a non-empty list",
                                     "messages")
    turns: list[dict] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(b["text"] for b in _blocks(content, f"{param}.content")
                          if b["type"] == "text")
            continue
        if role == "user":
            turn, blocks = "user", _blocks(content, f"{param}.content")
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise errors.invalid_request(f"Invalid value for '{param}.tool_calls': a list",
                                             f"{param}.tool_calls")
            turn = "assistant"
            blocks = _blocks(content, f"{param}.content") + [
                _tool_use(c, f"{param}.tool_calls[{k}]") for k, c in enumerate(calls)]
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise errors.missing_parameter(f"{param}.tool_call_id")
            turn, blocks = "user", [{"type": "tool_result",
                                     "tool_use_id": message["tool_call_id"],
                                     "content": _blocks(content, f"{param}.content")}]
        else:
            raise errors.invalid_request(f"Invalid value for '{param}.role'", f"{param}.role")
        add_turn(turns, turn, "content", blocks)
    return some_turns(turns)


def _tools(chat: dict, body: dict) -> None:
    tools = chat.get("tools")
    if not tools:
        return
    if not isinstance(tools, list):
        raise errors.invalid_request("Invalid value for 'tools': a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise errors.invalid_request(f"Invalid value for 'tools[{i}]': a function tool",
                                         f"tools[{i}]")
        out.append({"name": function["name"], "input_schema": function.get("parameters")
                    or {"type": "object", "properties": {}},
                    **({"description": function["description"]}
                       if function.get("description") else {})})
    body["tools"] = out
    choice = chat.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    if choice in (None, "auto"):
        picked: dict = {"type": "auto"}
    elif choice in ("none", "required"):
        picked = {"type": "none" if choice == "none" else "any"}
    elif isinstance(function, dict) and isinstance(function.get("name"), str):
        picked = {"type": "tool", "name": function["name"]}
    else:
        raise errors.invalid_request("Invalid value for 'tool_choice'", "tool_choice")
    if chat.get("parallel_tool_calls") is False and picked["type"] != "none":
        picked["disable_parallel_tool_use"] = True
    if picked != {"type": "auto"}:
        body["tool_choice"] = picked


def to_messages(chat: dict, model: str) -> tuple[dict, Call]:
    """The Messages request a chat completion request asks for."""
    for name, why in UNSUPPORTED.items():
        if chat.get(name) not in (None, False):
            raise errors.unsupported_field(name, why)
    if chat.get("n") not in (None, 1):
        raise errors.unsupported_field("n", "Anthropic gives one answer per request")
    system: list[str] = []
    limit = chat.get("max_completion_tokens", chat.get("max_tokens"))
    body: dict = {"model": model, "messages": _turns(chat.get("messages"), system),
                  "max_tokens": DEFAULT_MAX_TOKENS if limit is None else limit}
    if system:
        body["system"] = "\n\n".join(system)
    _tools(chat, body)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k")):
        if chat.get(ours) is not None:
            body[theirs] = chat[ours]
    stop = chat.get("stop")
    if stop is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    fmt = chat.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema" and isinstance((fmt.get("json_schema") or {}).get("schema"), dict):
        body["output_config"] = {"format": {"type": "json_schema",
                                            "schema": fmt["json_schema"]["schema"]}}
    elif kind == "json_object":
        raise errors.unsupported_field("response_format", "Anthropic has no JSON mode without "
                                       "a schema; give a json_schema")
    elif fmt is not None and kind != "text":
        raise errors.invalid_request("Invalid value for 'response_format'", "response_format")
    if isinstance(chat.get("user"), str):
        body["metadata"] = {"user_id": chat["user"]}
    options = chat.get("stream_options")
    call = Call(model, chat.get("stream") is True,
                isinstance(options, dict) and options.get("include_usage") is True)
    if call.stream:
        body["stream"] = True
    return body, call


# --- the answer -------------------------------------------------------------------------------

def _usage(usage: object, prompt: int | None = None) -> dict:
    usage = usage if isinstance(usage, dict) else {}
    if prompt is None:  # the prompt is all of it, cached or not
        prompt = sum(int(usage.get(k) or 0) for k in (
            "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_answer(answer: dict, call: Call) -> dict:
    """The chat completion of a Messages answer."""
    blocks = [b for b in answer.get("content") or () if isinstance(b, dict)]
    text = "".join(b["text"] for b in blocks if b.get("type") == "text"
                   and isinstance(b.get("text"), str))
    calls = [{"id": str(b.get("id")), "type": "function",
              "function": {"name": str(b.get("name")),
                           "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}}
             for b in blocks if b.get("type") == "tool_use"]
    message: dict = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-" + str(answer.get("id") or uuid.uuid4().hex).removeprefix("msg_"),
            "object": "chat.completion", "created": int(time.time()), "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH.get(str(answer.get("stop_reason")), "stop")}],
            "usage": _usage(answer.get("usage"))}


def chat_chunks(events: Iterator[dict], call: Call) -> Iterator[dict]:
    """Chat completion chunks from Anthropic's stream events (their data, in order)."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": call.model}
    tools: dict[int, int] = {}  # content block index -> tool call index
    prompt, usage = 0, None
    for data in events:
        kind = data.get("type")
        delta: dict | None = None
        finish = None
        if kind == "message_start":
            message = data.get("message") or {}
            prompt = _usage(message.get("usage"))["prompt_tokens"]
            base["id"] = "chatcmpl-" + str(message.get("id") or "").removeprefix("msg_")
            delta = {"role": "assistant", "content": ""}
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                tools[data.get("index")] = len(tools)
                delta = {"tool_calls": [{"index": tools[data.get("index")],
                                         "id": str(block.get("id")), "type": "function",
                                         "function": {"name": str(block.get("name")),
                                                      "arguments": ""}}]}
        elif kind == "content_block_delta":
            inner = data.get("delta") or {}
            if inner.get("type") == "text_delta" and inner.get("text"):
                delta = {"content": inner["text"]}
            elif inner.get("type") == "input_json_delta" and data.get("index") in tools \
                    and inner.get("partial_json"):
                delta = {"tool_calls": [{"index": tools[data["index"]], "function": {
                    "arguments": inner["partial_json"]}}]}
        elif kind == "message_delta":
            usage = _usage(data.get("usage"), prompt)
            finish = FINISH.get(str((data.get("delta") or {}).get("stop_reason")), "stop")
            delta = {}
        elif kind == "error":
            error = data.get("error") or {}
            raise errors.relayed(502, {"error": {"message": error.get("message"),
                                                 "type": error.get("type")}})
        if delta is not None:
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if call.include_usage:
        yield {**base, "choices": [], "usage": usage or _usage(None, prompt)}


def listed_models(listing: dict) -> list[str]:
    """The model ids of a ``GET /v1/models`` page of Anthropic's (or OpenAI's)."""
    return [m["id"] for m in listing.get("data") or () if isinstance(m, dict)
            and isinstance(m.get("id"), str) and m["id"]]

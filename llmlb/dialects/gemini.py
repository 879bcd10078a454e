"""Google's Gemini API as llmlb speaks it to the hosted provider (AG-4, ``google:<model>``):
a chat completion request out as a ``generateContent`` request, Gemini's answer back as a chat
completion, and its stream (``streamGenerateContent?alt=sse``, one ``GenerateContentResponse``
per event) back as chat completion chunks. The Responses and Messages APIs reach Gemini
through chat completions (``responses.py``, ``messages.py``). Pure functions.

Why the native API rather than Gemini's OpenAI-compatible endpoint (``/v1beta/openai/``):
Google documents that layer as beta and recommends the native API to anyone not already on
the OpenAI libraries; it takes Gemini's own features (thinking, JSON Schema outputs, safety)
only through ``extra_body``, and answers errors in yet another shape. ``generateContent`` is
the API every Google SDK speaks, so that is the one kept here.

Mapping choices: system and developer messages become ``systemInstruction``; ``assistant``
is ``model``; a tool's result is a ``functionResponse`` part of a user turn, named after the
call it answers (its JSON object as the response, other text as ``{"result": text}``);
consecutive turns of one role join, as Gemini wants turns to alternate. Tools go as
``functionDeclarations`` with ``parametersJsonSchema`` (full JSON Schema), a JSON schema output
as ``responseJsonSchema``. Gemini gives calls no ids: each gets one, and the call's
``thoughtSignature`` (which Gemini wants back with the call on the next turn) travels inside
that id. Thought parts are not part of the answer. Parameters Gemini has no equivalent of
(``logprobs``, ``logit_bias``, ``n`` > 1) are a 400 naming them, as on llmlb's own models.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import errors
from .turns import add_turn, some_turns

FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
          "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
          "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter"}
UNSUPPORTED = {"logprobs": "Gemini returns no log probabilities through llmlb",
               "top_logprobs": "Gemini returns no log probabilities through llmlb",
               "logit_bias": "Gemini has no logit bias", "functions": "use 'tools'",
               "audio": "Gemini's audio output is not supported through llmlb"}
_SIGNATURE = "__ts_"  # where a tool call id carries Gemini's thoughtSignature


@dataclass
class Call:
    """What the answer needs to know of the request it answers."""

    model: str
    stream: bool = False
    include_usage: bool = False
    tool_names: dict[str, str] = field(default_factory=dict)  # call id -> function name


# --- the request ------------------------------------------------------------------------------

def _parts(content: object, param: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise errors.invalid_request(f"Invalid value for '{param}': a string or a list of "
                                     "content parts", param)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(
                part.get("image_url"), dict) else None
            head, _, data = str(url or "").partition(",")
            if not (head.startswith("data:") and head.endswith(";base64") and data):
                raise errors.unsupported_field(f"{param}[{j}].image_url", "Gemini takes "
                                               "images inline: give a data: URL (base64)")
            parts.append({"inlineData": {"mimeType": head[5:-7], "data": data}})
        else:
            raise errors.invalid_request(f"Invalid value for '{param}[{j}]': a text or "
                                         "image_url part", f"{param}[{j}]")
    return parts


def _call_part(call: object, param: str, call_ids: dict[str, str]) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise errors.missing_parameter(f"{param}.function.name")
    arguments = function.get("arguments") or "{}"
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise errors.invalid_request(f"Invalid value for '{param}.function.arguments': a JSON "
                                     "object", f"{param}.function.arguments") from None
    part: dict = {"functionCall": {"name": function["name"],
                                   "args": args if isinstance(args, dict) else {}}}
    call_id = str(call.get("id") or "")
    call_ids[call_id] = function["name"]
    signature = _signature_of(call_id)
    if signature:
        part["thoughtSignature"] = signature
    return part


def _result_part(message: dict, param: str, call_ids: dict[str, str]) -> dict:
    call_id = message.get("tool_call_id")
    name = call_ids.get(str(call_id)) or message.get("name")
    if not isinstance(name, str):
        raise errors.invalid_request(f"Invalid value for '{param}.tool_call_id': no earlier "
                                     "assistant tool call has this id", f"{param}.tool_call_id")
    text = "".join(p.get("text", "") for p in _parts(message.get("content"), f"{param}.content"))
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return {"functionResponse": {"name": name, "response": value if isinstance(value, dict)
                                 else {"result": text}}}


def _contents(messages: object, system: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise errors.invalid_request("Invalid value for 'messages': a non-empty list",
                                     "messages")
    contents: list[dict] = []
    call_ids: dict[str, str] = {}
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(_parts(message.get("content"), f"{param}.content"))
            continue
        if role == "user":
            turn, parts = "user", _parts(message.get("content"), f"{param}.content")
        elif role == "assistant":
            turn, parts = "model", _parts(message.get("content"), f"{param}.content")
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise errors.invalid_request(f"Invalid value for '{param}.tool_calls': a list",
                                             f"{param}.tool_calls")
            parts += [_call_part(c, f"{param}.tool_calls[{k}]", call_ids)
                      for k, c in enumerate(calls)]
        elif role == "tool":
            turn, parts = "user", [_result_part(message, param, call_ids)]
        else:
            raise errors.invalid_request(f"Invalid value for '{param}.role'", f"{param}.role")
        add_turn(contents, turn, "parts", parts)
    return some_turns(contents)


def _tools(chat: dict) -> list[dict]:
    tools = chat.get("tools")
    if not tools:
        return []
    if not isinstance(tools, list):
        raise errors.invalid_request("Invalid value for 'tools': a list", "tools")
    declarations = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise errors.invalid_request(f"Invalid value for 'tools[{i}]': a function tool",
                                         f"tools[{i}]")
        declaration = {"name": function["name"]}
        if function.get("description"):
            declaration["description"] = function["description"]
        if function.get("parameters"):
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def _tool_config(choice: object) -> dict | None:
    if choice is None or choice == "auto":
        return None
    if choice in ("none", "required"):
        return {"functionCallingConfig": {"mode": "NONE" if choice == "none" else "ANY"}}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"functionCallingConfig": {"mode": "ANY",
                                          "allowedFunctionNames": [function["name"]]}}
    raise errors.invalid_request("Invalid value for 'tool_choice'", "tool_choice")


def _generation_config(chat: dict) -> dict:
    config: dict = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"),
                         ("seed", "seed"), ("presence_penalty", "presencePenalty"),
                         ("frequency_penalty", "frequencyPenalty")):
        if chat.get(ours) is not None:
            config[theirs] = chat[ours]
    limit = chat.get("max_completion_tokens", chat.get("max_tokens"))
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = chat.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    fmt = chat.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    elif fmt is not None and kind != "text":
        raise errors.invalid_request("Invalid value for 'response_format'", "response_format")
    return config


def to_gemini(chat: dict, model: str) -> tuple[dict, Call]:
    """The ``generateContent`` request a chat completion request asks for."""
    for name, why in UNSUPPORTED.items():
        if chat.get(name) not in (None, False):
            raise errors.unsupported_field(name, why)
    if chat.get("n") not in (None, 1):
        raise errors.unsupported_field("n", "llmlb asks Gemini for one answer per request")
    system: list[dict] = []
    body: dict = {"contents": _contents(chat.get("messages"), system)}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = _tools(chat)
    if tools:
        body["tools"] = tools
        config = _tool_config(chat.get("tool_choice"))
        if config is not None:
            body["toolConfig"] = config
    generation = _generation_config(chat)
    if generation:
        body["generationConfig"] = generation
    options = chat.get("stream_options")
    return body, Call(model, chat.get("stream") is True,
                      isinstance(options, dict) and options.get("include_usage") is True)


def count_request(body: dict, model: str) -> dict:
    """The ``countTokens`` request for what a ``generateContent`` request would send."""
    return {"generateContentRequest": {"model": f"models/{model}", **body}}


# --- the answer -------------------------------------------------------------------------------

def _call_id(signature: str | None) -> str:
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    if signature:  # base64 as an id may hold: letters, digits, '-' and '_'
        call_id += _SIGNATURE + signature.replace("+", "-").replace("/", "_").rstrip("=")
    return call_id


def _signature_of(call_id: str) -> str | None:
    _, found, encoded = call_id.partition(_SIGNATURE)
    if not found or not encoded:
        return None
    text = encoded.replace("-", "+").replace("_", "/")
    try:
        base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return text + "=" * (-len(text) % 4)


def _tool_call(part: dict, index: int | None = None) -> dict:
    call = part["functionCall"]
    out = {"id": _call_id(part.get("thoughtSignature")), "type": "function",
           "function": {"name": str(call.get("name")),
                        "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def _usage(metadata: object) -> dict:
    metadata = metadata if isinstance(metadata, dict) else {}
    prompt = int(metadata.get("promptTokenCount") or 0)
    completion = int(metadata.get("candidatesTokenCount") or 0) + \
        int(metadata.get("thoughtsTokenCount") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish(reason: object, called: bool) -> str:
    if called and reason in (None, "STOP"):
        return "tool_calls"
    return FINISH.get(str(reason), "stop")


def _candidate(answer: dict) -> dict:
    candidates = answer.get("candidates")
    return candidates[0] if isinstance(candidates, list) and candidates and \
        isinstance(candidates[0], dict) else {}


def _answer_parts(candidate: dict) -> list[dict]:
    parts = (candidate.get("content") or {}).get("parts")
    return [p for p in parts if isinstance(p, dict) and not p.get("thought")] \
        if isinstance(parts, list) else []


def chat_answer(answer: dict, call: Call) -> dict:
    """The chat completion of a ``generateContent`` answer."""
    _raise_error(answer)
    candidate = _candidate(answer)
    parts = _answer_parts(candidate)
    text = "".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    calls = [_tool_call(p) for p in parts if isinstance(p.get("functionCall"), dict)]
    message: dict = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    reason = candidate.get("finishReason") if candidate else "SAFETY"  # blocked prompt
    return {"id": f"chatcmpl-{answer.get('responseId') or uuid.uuid4().hex}",
            "object": "chat.completion", "created": int(time.time()), "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(reason, bool(calls))}],
            "usage": _usage(answer.get("usageMetadata"))}


def chat_chunks(events: Iterator[dict], call: Call) -> Iterator[dict]:
    """Chat completion chunks from the events of ``streamGenerateContent?alt=sse``."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": call.model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}]}
    calls, usage, finished = 0, None, False
    for answer in events:
        _raise_error(answer)
        usage = answer.get("usageMetadata") or usage
        candidate = _candidate(answer)
        for part in _answer_parts(candidate):
            if isinstance(part.get("text"), str) and part["text"]:
                delta: dict = {"content": part["text"]}
            elif isinstance(part.get("functionCall"), dict):
                delta = {"tool_calls": [_tool_call(part, calls)]}
                calls += 1
            else:
                continue
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        reason = candidate.get("finishReason") if candidate else \
            ("SAFETY" if answer.get("promptFeedback") else None)
        if reason and not finished:
            finished = True
            yield {**base, "choices": [{"index": 0, "delta": {},
                                        "finish_reason": _finish(reason, calls > 0)}]}
    if not finished:
        yield {**base, "choices": [{"index": 0, "delta": {},
                                    "finish_reason": "tool_calls" if calls else "stop"}]}
    if call.include_usage:
        yield {**base, "choices": [], "usage": _usage(usage)}


def _raise_error(answer: dict) -> None:
    """Gemini's error object (``{"error": {"code", "message", "status"}}``), raised."""
    error = answer.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        raise errors.relayed(code if isinstance(code, int) and code >= 400 else 502,
                             {"error": {"message": error.get("message"),
                                        "code": str(error.get("status") or "").lower() or None}})


def error_status(status: int, body: object) -> int:
    """The status an error of Gemini's means: it answers a key it refuses with 400
    ``API_KEY_INVALID``, which is the balancer's credentials failing (401), not the client's
    request."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if status == 400 and isinstance(details, list) and any(
            isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details):
        return 401
    return status


def listed_models(listing: dict) -> list[str]:
    """The model names of a ``GET /v1beta/models`` page that can generate content."""
    names = []
    for model in listing.get("models") or ():
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            continue
        methods = model.get("supportedGenerationMethods")
        if isinstance(methods, list) and "generateContent" not in methods:
            continue
        names.append(model["name"].removeprefix("models/"))
    return names

"""Anthropic's Messages API (AG-2) as conversions to and from chat completions, llmlb's
internal form: the request in (``system``, content blocks, ``tools`` with ``input_schema``,
``tool_choice``, ``stop_sequences``, ``output_config.format``), the answer out (content blocks,
``stop_reason``, ``usage``), the stream as Anthropic's events (``message_start``,
``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``, ``message_stop``; an
error as an ``error`` event), and ``count_tokens``'s request. Pure functions: a node runs them
around its chat path (``serving/agents.py``), the balancer around an endpoint's or a hosted
provider's chat completions (``balancer/translate.py``). The other way round, llmlb as a
client of Anthropic, is ``messages_upstream.py``.

Mapping choices (compared with vLLM's ``entrypoints/anthropic``, llama.cpp's server and
LiteLLM): every ``system`` text, and a ``system`` message inside ``messages`` (Claude Code
sends one), joins the one leading system message, which every chat template accepts; a user
message's ``tool_result`` blocks become ``tool`` messages before its text; ``thinking`` blocks
are dropped (the model never wrote them); tool ids pass through, so a ``tool_result`` finds
its call. Fields that only tune or annotate (``thinking``, ``metadata``,
``context_management``, ``cache_control``, ``output_config.effort``, ``service_tier``…) are
accepted and ignored; tools llmlb cannot run (Anthropic's server tools: web search, code
execution…) are not offered to the model, and the answer says so (``unrunnable_tools``);
images and documents, which a text model cannot read, are a 400 naming the block.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import errors
from ..wire import named_event

log = logging.getLogger(__name__)

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
#: chat parameters as this API names them, for errors the chat path raises
PARAMS = {"messages": "messages", "max_completion_tokens": "max_tokens", "stop": "stop_sequences",
          "response_format.json_schema.schema": "output_config.format.schema",
          "tool_choice": "tool_choice", "tools": "tools"}


@dataclass
class Request:
    """What the answer needs to know of the request it answers."""

    model: str
    stream: bool = False
    unrunnable: list[str] = field(default_factory=list)


# --- the request ------------------------------------------------------------------------------

def _text_of(blocks: object, param: str) -> str:
    """The text of a string or a list of text blocks (``system``, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise errors.invalid_request(f"Invalid value for '{param}': a string or a list of "
                                     "content blocks", param)
    out = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            out.append(block["text"])
        elif kind in ("image", "document", "search_result"):
            raise errors.unsupported_field(f"{param}[{j}]", f"a {kind} block needs a model "
                                           "that reads it; llmlb's models read text")
        else:
            raise errors.invalid_request(f"Invalid value for '{param}[{j}]': a text block",
                                         f"{param}[{j}]")
    return "\n".join(out)


def _message(i: int, message: object, system: list[str]) -> list[dict]:
    """One Anthropic message as chat messages (tool results first)."""
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise errors.invalid_request(f"Invalid value for '{param}': an object", param)
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant", "system"):
        raise errors.invalid_request(f"Invalid value for '{param}.role': 'user' or "
                                     "'assistant'", f"{param}.role")
    if content is None:
        raise errors.missing_parameter(f"{param}.content")
    if role == "system":
        system.append(_text_of(content, f"{param}.content"))
        return []
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise errors.invalid_request(f"Invalid value for '{param}.content': a string or a "
                                     "list of content blocks", f"{param}.content")
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise errors.invalid_request(f"Invalid value for '{where}.text': a string",
                                             f"{where}.text")
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise errors.missing_parameter(f"{where}.id' and '{where}.name")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"],
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise errors.missing_parameter(f"{where}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _text_of(block.get("content") or "", f"{where}.content")})
        elif kind in ("thinking", "redacted_thinking", "server_tool_use",
                      "web_search_tool_result", "web_fetch_tool_result",
                      "code_execution_tool_result"):
            continue  # the model never wrote these, or they came from tools llmlb does not run
        elif kind in ("image", "document", "search_result", "container_upload"):
            raise errors.unsupported_field(where, f"a {kind} block needs a model that reads "
                                           "it; llmlb's models read text")
        else:
            raise errors.invalid_request(f"Invalid value for '{where}.type': {kind!r} is not "
                                         f"a content block of a {role} message", f"{where}.type")
    out = list(results)
    if role == "assistant":
        if texts or calls:
            out.append({"role": "assistant", "content": "".join(texts) or None,
                        **({"tool_calls": calls} if calls else {})})
    elif texts or not results:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _tools(body: dict, unrunnable: list[str]) -> list[dict]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise errors.invalid_request("Invalid value for 'tools': a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise errors.invalid_request(f"Invalid value for 'tools[{i}]': an object",
                                         f"tools[{i}]")
        kind = tool.get("type")
        if kind not in (None, "custom") or "input_schema" not in tool:
            unrunnable.append(str(tool.get("name") or kind))  # a server tool: Anthropic's own
            continue
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(body: dict, chat_body: dict) -> None:
    choice = body.get("tool_choice")
    if choice is None or not chat_body.get("tools"):
        if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            raise errors.invalid_request("'tool_choice' needs 'tools' it can choose from",
                                         "tool_choice")
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat_body["tool_choice"] = "auto"
    elif kind == "any":
        chat_body["tool_choice"] = "required"
    elif kind == "none":
        chat_body["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat_body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise errors.invalid_request("Invalid value for 'tool_choice': {\"type\": \"auto\" | "
                                     "\"any\" | \"none\"} or {\"type\": \"tool\", \"name\": …}",
                                     "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        chat_body["parallel_tool_calls"] = False


def _output_format(body: dict) -> dict | None:
    """``output_config.format`` (or the beta's ``output_format``): a JSON schema output."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    param = "output_config.format"
    if fmt is None and body.get("output_format") is not None:
        fmt, param = body["output_format"], "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" \
            or not isinstance(fmt.get("schema"), dict):
        raise errors.invalid_request(f"Invalid value for '{param}': {{\"type\": \"json_schema\", "
                                     "\"schema\": {…}}", param)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def to_chat(body: dict, *, count_only: bool = False) -> tuple[dict, Request]:
    """The chat completion request a Messages request asks for."""
    model = body.get("model")
    if model is None:
        raise errors.missing_parameter("model")
    if not count_only and body.get("max_tokens") is None:
        raise errors.missing_parameter("max_tokens")
    messages = body.get("messages")
    if messages is None:
        raise errors.missing_parameter("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.invalid_request("Invalid value for 'messages': a non-empty list",
                                     "messages")
    system: list[str] = []
    if body.get("system") is not None:
        system.append(_text_of(body["system"], "system"))
    converted = [m for i, message in enumerate(messages) for m in _message(i, message, system)]
    req = Request(str(model), body.get("stream") is True)
    chat_body: dict = {"model": model, "messages": ([{"role": "system",
                                                       "content": "\n\n".join(system)}]
                                                     if system else []) + converted}
    tools = _tools(body, req.unrunnable)
    if tools:
        chat_body["tools"] = tools
    if req.unrunnable:
        log.warning("Not offered to the model (llmlb cannot run them): %s",
                    ", ".join(req.unrunnable))
    if count_only:
        return chat_body, req
    _tool_choice(body, chat_body)
    fmt = _output_format(body)
    if fmt is not None:
        chat_body["response_format"] = fmt
    for ours, theirs in (("max_completion_tokens", "max_tokens"), ("stop", "stop_sequences"),
                         ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k")):
        if body.get(theirs) is not None:
            chat_body[ours] = body[theirs]
    if req.stream:
        chat_body.update(stream=True, stream_options={"include_usage": True})
    return chat_body, req


# --- the answer -------------------------------------------------------------------------------

def _tool_id(chat_id: str) -> str:
    return "toolu_" + chat_id.removeprefix("call_")


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}  # cut short by max_tokens: stop_reason says so
    return value if isinstance(value, dict) else {}


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "output_tokens": completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _stop(finish: str | None, stop_sequence: str | None) -> tuple[str, str | None]:
    if finish == "stop" and stop_sequence is not None:
        return "stop_sequence", stop_sequence
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def from_chat(answer: dict, req: Request) -> dict:
    """The Messages answer of a chat completion."""
    choice = answer["choices"][0]
    message = choice["message"]
    content: list[dict] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        content.append({"type": "tool_use", "id": _tool_id(call["id"]),
                        "name": call["function"]["name"],
                        "input": _input(call["function"]["arguments"])})
    reason, sequence = _stop(choice.get("finish_reason"), choice.get("stop_reason"))
    usage = answer.get("usage") or {}
    return {"id": "msg_" + str(answer.get("id") or uuid.uuid4().hex).removeprefix("chatcmpl-"),
            "type": "message",
            "role": "assistant", "model": req.model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))}


def events(chunks: Iterator[dict | None], req: Request, prompt_tokens: int,
           ) -> Iterator[tuple[str, dict] | None]:
    """Anthropic's stream events from chat completion chunks (their usage chunk last); a None
    among the chunks (the end of what has arrived so far) is passed on as it is."""
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    yield "message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": req.model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": _usage(prompt_tokens, 0)}}
    index, open_kind = -1, None
    finish, sequence, usage = None, None, None
    for chunk in chunks:
        if chunk is None:
            yield None
            continue
        if not chunk.get("choices"):
            usage = chunk.get("usage") or usage
            continue
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("content"):
            if open_kind != "text":
                if open_kind is not None:
                    yield "content_block_stop", {"type": "content_block_stop", "index": index}
                index, open_kind = index + 1, "text"
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "text", "text": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta",
                                                    "text": delta["content"]}}
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if call.get("id"):
                if open_kind is not None:
                    yield "content_block_stop", {"type": "content_block_stop", "index": index}
                index, open_kind = index + 1, "tool"
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {
                                                  "type": "tool_use", "id": _tool_id(call["id"]),
                                                  "name": function.get("name"), "input": {}}}
            if function.get("arguments"):
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "input_json_delta",
                                                        "partial_json": function["arguments"]}}
        if choice.get("finish_reason"):
            finish, sequence = choice["finish_reason"], choice.get("stop_reason")
        usage = chunk.get("usage") or usage
    if open_kind is not None:
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    reason, stop_sequence = _stop(finish, sequence)
    usage = usage or {}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                            "usage": _usage(usage.get("prompt_tokens", prompt_tokens),
                                            usage.get("completion_tokens", 0))}
    yield "message_stop", {"type": "message_stop"}


def error_event(err: errors.APIError) -> bytes:
    return named_event("error", err.anthropic_body())


def stream_ended(tail: bytes) -> bool:
    """Whether a stream's last bytes end it as Anthropic's streams end."""
    return b"message_stop" in tail[-256:] or b"event: error" in tail[-4096:]


# --- the stream and errors, framed -----------------------------------------------------------

def framed(chunks: Iterator[dict | None], req: Request, prompt_tokens: int,
           ) -> Iterator[bytes | None]:
    """The stream's events as server-sent events (a None passed on as it came); an error
    while it runs as the error event that ends it."""
    try:
        for item in events(chunks, req, prompt_tokens):
            yield item if item is None else named_event(*item)
    except errors.APIError as exc:
        yield error_event(exc)
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are sent: the error can only travel as an event
        log.exception("Stream failed")
        yield error_event(errors.from_exception(exc))


def renamed(err: errors.APIError, names: dict[str, str]) -> errors.APIError:
    """A chat error about a field, naming the field as this API calls it."""
    param = err.param or ""
    for ours, theirs in names.items():
        if param == ours or param.startswith(ours + ".") or param.startswith(ours + "["):
            new = theirs + param[len(ours):]
            err.message = err.message.replace(f"'{param}'", f"'{new}'")
            err.param = new
            break
    return err

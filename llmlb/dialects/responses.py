"""OpenAI's Responses API (AG-1) as conversions to and from chat completions, llmlb's internal
form: the request in (``instructions``, ``input`` items — ``message``, ``function_call``,
``function_call_output`` —, function and namespace ``tools``, ``tool_choice``,
``text.format``, ``max_output_tokens``), the response object out (``output`` items,
``status``, ``usage``), and the stream as the typed events the SDK parses
(``response.created`` … ``response.completed``; an error as an ``error`` event). Pure
functions: a node runs them around its chat path (``serving/agents.py``), the balancer around
an endpoint's or a hosted provider's chat completions (``balancer/translate.py``).

Mapping choices (compared with vLLM's Responses serving, llama.cpp's server and LiteLLM):
``instructions`` and every ``system`` / ``developer`` message join the one leading system
message (what every chat template accepts); consecutive ``function_call`` items join the
assistant message before them, as chat's ``tool_calls``; ``reasoning`` items and the calls
of hosted tools are dropped (the model never made them). Fields that only tune or annotate
(``reasoning``, ``include``, ``prompt_cache_key``, ``client_metadata``, ``metadata``,
``service_tier``, ``truncation``, ``store``…) are accepted; hosted tools (``web_search``,
``file_search``, computer use…) are not offered and the answer says so; a ``namespace`` is
offered as its functions and its calls carry the namespace back. ``previous_response_id``
and ``store`` are the balancer's (``balancer/stored_responses.py``): a node sees the whole
input and only echoes the id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import errors
from ..wire import named_event

log = logging.getLogger(__name__)

PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
          "response_format.json_schema": "text.format", "response_format": "text.format",
          "tools": "tools", "tool_choice": "tool_choice", "top_logprobs": "top_logprobs"}
#: request fields the response object repeats as they were sent
ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
          "previous_response_id", "reasoning", "service_tier", "store", "temperature", "text",
          "tool_choice", "tools", "top_p", "truncation", "user", "prompt_cache_key")
ECHO_DEFAULTS = {"parallel_tool_calls": True, "store": True, "temperature": 1.0,
                 "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                 "top_p": 1.0, "truncation": "disabled", "metadata": {}}
SKIPPED_ITEMS = ("reasoning", "web_search_call", "file_search_call", "computer_call",
                 "computer_call_output", "image_generation_call", "code_interpreter_call",
                 "mcp_list_tools", "mcp_call", "mcp_approval_request", "mcp_approval_response",
                 "compaction")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text")


@dataclass
class Request:
    """What the answer needs to know of the request it answers."""

    model: str
    echo: dict
    namespaces: dict[str, str] = field(default_factory=dict)  # function name -> namespace
    unrunnable: list[str] = field(default_factory=list)
    stream: bool = False


# --- the request ------------------------------------------------------------------------------

def _content_text(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.invalid_request(f"Invalid value for '{param}': a string or a list of "
                                     "content parts", param)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise errors.invalid_request(f"Invalid value for '{param}[{j}].text': a string",
                                             f"{param}[{j}].text")
            out.append(text)
        elif kind in ("input_image", "input_file", "input_audio"):
            raise errors.unsupported_field(f"{param}[{j}]", f"{kind} needs a model that reads "
                                           "it; llmlb's models read text")
        else:
            raise errors.invalid_request(f"Invalid value for '{param}[{j}].type': {kind!r} is "
                                         "not a content part", f"{param}[{j}].type")
    return "".join(out)


def _input_messages(items: object, system: list[str]) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise errors.invalid_request("Invalid value for 'input': a string or a list of items",
                                     "input")
    out: list[dict] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise errors.invalid_request(f"Invalid value for '{param}': an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text = _content_text(item.get("content"), f"{param}.content")
            if role in ("system", "developer"):
                system.append(text)
            elif role in ("user", "assistant"):
                out.append({"role": role, "content": text})
            else:
                raise errors.invalid_request(f"Invalid value for '{param}.role': user, "
                                             "assistant, system or developer", f"{param}.role")
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise errors.missing_parameter(f"{param}.call_id', '{param}.name' and "
                                               f"'{param}.arguments")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise errors.missing_parameter(f"{param}.call_id")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _content_text(item.get("output", ""), f"{param}.output")})
        elif kind in SKIPPED_ITEMS:
            continue  # what the model never made, or hosted tools' calls llmlb never runs
        else:
            raise errors.unsupported_field(f"{param}.type", f"input items of type {kind!r} are "
                                           "not supported (message, function_call and "
                                           "function_call_output are)")
    return out


def _function(tool: dict, param: str) -> dict:
    function = {"name": tool.get("name"), "parameters": tool.get("parameters")}
    for key in ("description", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    if not isinstance(function["name"], str):
        raise errors.missing_parameter(f"{param}.name")
    if function["parameters"] is None:
        del function["parameters"]
    return {"type": "function", "function": function}


def _tools(tools: object, req: Request) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise errors.invalid_request("Invalid value for 'tools': a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            out.append(_function(tool, f"tools[{i}]"))
        elif kind == "namespace" and isinstance(tool.get("tools"), list):
            for j, inner in enumerate(tool["tools"]):
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    out.append(_function(inner, f"tools[{i}].tools[{j}]"))
                    req.namespaces[str(inner.get("name"))] = str(tool.get("name"))
        elif kind == "custom":
            raise errors.unsupported_field(f"tools[{i}]", "custom (free-form) tools are not "
                                           "supported; give it as a function tool")
        elif isinstance(kind, str):
            req.unrunnable.append(kind)  # hosted: web_search, file_search, computer use, mcp…
        else:
            raise errors.invalid_request(f"Invalid value for 'tools[{i}].type'",
                                         f"tools[{i}].type")
    return out


def _tool_choice(choice: object, chat_body: dict) -> None:
    if choice is None or not chat_body.get("tools"):
        return  # nothing to choose from: the model writes text
    if choice in ("auto", "none", "required"):
        chat_body["tool_choice"] = choice
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        chat_body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        allowed = {t.get("name") for t in choice["tools"] if isinstance(t, dict)}
        chat_body["tools"] = [t for t in chat_body["tools"] if t["function"]["name"] in allowed]
        if chat_body["tools"]:
            chat_body["tool_choice"] = "required" if choice.get("mode") == "required" else "auto"
    else:
        raise errors.unsupported_field("tool_choice", "only 'auto', 'none', 'required', a "
                                       "function or allowed_tools can be chosen; hosted tools "
                                       "are not run by llmlb")


def _text_format(text: object) -> dict | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        schema.setdefault("name", "output")
        return {"type": "json_schema", "json_schema": schema}
    raise errors.invalid_request("Invalid value for 'text.format': text, json_object or "
                                 "json_schema", "text.format")


def to_chat(body: dict) -> tuple[dict, Request]:
    """The chat completion request a Responses request asks for."""
    model = body.get("model")
    if model is None:
        raise errors.missing_parameter("model")
    if body.get("input") is None:
        raise errors.missing_parameter("input")
    for name, why in (("background", "llmlb answers in the request (no background mode)"),
                      ("conversation", "use previous_response_id to continue a response"),
                      ("prompt", "stored prompt templates are OpenAI's")):
        if body.get(name) not in (None, False):
            raise errors.unsupported_field(name, why)
    echo = {k: body.get(k, ECHO_DEFAULTS.get(k)) for k in ECHOED}
    req = Request(str(model), echo, stream=body.get("stream") is True)
    system: list[str] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise errors.invalid_request("Invalid value for 'instructions': a string",
                                         "instructions")
        system.append(body["instructions"])
    messages = _input_messages(body["input"], system)
    if not messages:
        raise errors.invalid_request("Invalid value for 'input': no message to answer", "input")
    chat_body: dict = {"model": model, "messages": ([{"role": "system",
                                                       "content": "\n\n".join(system)}]
                                                     if system else []) + messages}
    tools = _tools(body.get("tools"), req)
    if tools:
        chat_body["tools"] = tools
    if req.unrunnable:
        log.warning("Not offered to the model (llmlb cannot run them): %s",
                    ", ".join(req.unrunnable))
    _tool_choice(body.get("tool_choice"), chat_body)
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        chat_body["response_format"] = fmt
    for ours, theirs in (("max_completion_tokens", "max_output_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("seed", "seed")):
        if body.get(theirs) is not None:
            chat_body[ours] = body[theirs]
    if body.get("top_logprobs"):
        chat_body.update(logprobs=True, top_logprobs=body["top_logprobs"])
    if req.stream:
        chat_body.update(stream=True, stream_options={"include_usage": True})
    return chat_body, req


# --- the answer -------------------------------------------------------------------------------

def _usage(usage: dict | None) -> dict:
    usage = usage or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_object(response_id: str, created: int, req: Request, status: str,
                     output: list[dict], usage: dict | None,
                     finish: str | None = None) -> dict:
    """The response object; ``usage`` last, where the balancer finds it in a stream's end."""
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "content_filter" if finish == "content_filter"
                      else "max_output_tokens"}
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "background": False, "error": None, "incomplete_details": incomplete,
            "model": req.model, "output": output, **req.echo, "usage": usage}


def _status(finish: str | None) -> str:
    return "incomplete" if finish in ("length", "content_filter") else "completed"


def _logprobs(chat_logprobs: dict | None) -> list[dict]:
    return list((chat_logprobs or {}).get("content") or [])


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict]) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": logprobs}]}


def _call_item(item_id: str, call: dict, req: Request, status: str) -> dict:
    name = call["function"]["name"]
    item = {"type": "function_call", "id": item_id, "call_id": call["id"], "name": name,
            "arguments": call["function"].get("arguments", ""), "status": status}
    if name in req.namespaces:
        item["namespace"] = req.namespaces[name]
    return item


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def from_chat(answer: dict, req: Request) -> dict:
    """The response object of a chat completion."""
    choice = answer["choices"][0]
    message = choice["message"]
    status = _status(choice.get("finish_reason"))
    output = []
    if message.get("content"):
        output.append(_message_item(_new_id("msg"), message["content"], status,
                                    _logprobs(choice.get("logprobs"))))
    for call in message.get("tool_calls") or ():
        output.append(_call_item(_new_id("fc"), call, req, "completed"))
    return response_object(_new_id("resp"), answer.get("created") or int(time.time()), req,
                           status, output,
                           _usage(answer.get("usage")), choice.get("finish_reason"))


class _Events:
    """Numbers the events of one stream and keeps its output items."""

    def __init__(self, req: Request) -> None:
        self.req, self.sequence = req, 0
        self.response_id, self.created = _new_id("resp"), int(time.time())
        self.output: list[dict] = []

    def event(self, kind: str, **fields: object) -> tuple[str, dict]:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return kind, data

    def response(self, status: str, usage: dict | None = None,
                 finish: str | None = None) -> dict:
        return response_object(self.response_id, self.created, self.req, status,
                               list(self.output), usage, finish)


def events(chunks: Iterator[dict | None], req: Request,
           ) -> Iterator[tuple[str, dict] | None]:
    """The Responses stream from chat completion chunks (their usage chunk last); a None
    among the chunks (the end of what has arrived so far) is passed on as it is."""
    ev = _Events(req)
    yield ev.event("response.created", response=ev.response("in_progress"))
    yield ev.event("response.in_progress", response=ev.response("in_progress"))
    item: dict | None = None  # the output item being written
    text, logprobs = "", []
    finish, usage = None, None

    def close(status: str) -> Iterator[tuple[str, dict]]:
        nonlocal item, text, logprobs
        if item is None:
            return
        index = len(ev.output)
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [],
                    "logprobs": logprobs}
            yield ev.event("response.output_text.done", item_id=item["id"], output_index=index,
                           content_index=0, text=text, logprobs=logprobs)
            yield ev.event("response.content_part.done", item_id=item["id"],
                           output_index=index, content_index=0, part=part)
            done = _message_item(item["id"], text, status, logprobs)
        else:
            yield ev.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=index, name=item["name"], arguments=item["arguments"])
            done = {**item, "status": "completed"}
        yield ev.event("response.output_item.done", output_index=index, item=done)
        ev.output.append(done)
        item, text, logprobs = None, "", []

    for chunk in chunks:
        if chunk is None:
            yield None
            continue
        if not chunk.get("choices"):
            usage = chunk.get("usage") or usage
            continue
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        index = len(ev.output)
        if delta.get("content"):
            if item is None or item["type"] != "message":
                yield from close("completed")
                index = len(ev.output)
                item = _message_item(_new_id("msg"), "", "in_progress", [])
                item["content"] = []
                yield ev.event("response.output_item.added", output_index=index, item=item)
                yield ev.event("response.content_part.added", item_id=item["id"],
                               output_index=index, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": [],
                                     "logprobs": []})
            piece = _logprobs(choice.get("logprobs"))
            text += delta["content"]
            logprobs += piece
            yield ev.event("response.output_text.delta", item_id=item["id"], output_index=index,
                           content_index=0, delta=delta["content"], logprobs=piece)
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if call.get("id"):
                yield from close("completed")
                index = len(ev.output)
                item = _call_item(_new_id("fc"), {"id": call["id"], "function": {
                    "name": function.get("name"), "arguments": ""}}, req, "in_progress")
                yield ev.event("response.output_item.added", output_index=index, item=dict(item))
            if function.get("arguments") and item is not None:
                item["arguments"] += function["arguments"]
                yield ev.event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=index, delta=function["arguments"])
        finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    status = _status(finish)
    yield from close(status)
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield ev.event(kind, response=ev.response(status, _usage(usage), finish))


def error_event(err: errors.APIError, sequence: int = 0) -> bytes:
    return named_event("error", {"type": "error", "code": err.code, "message": err.message,
                                 "param": err.param, "sequence_number": sequence})


def stream_ended(tail: bytes) -> bool:
    """Whether a stream's last bytes end it as the Responses API's streams end."""
    end = tail[-16384:]
    return any(marker in end for marker in (b"response.completed", b"response.incomplete",
                                            b"response.failed", b"event: error"))


# --- the stream and errors, framed -----------------------------------------------------------

def framed(chunks: Iterator[dict | None], req: Request) -> Iterator[bytes | None]:
    """The stream's events as server-sent events (a None passed on as it came); an error
    while it runs as the error event that ends it."""
    sequence = 0
    try:
        for item in events(chunks, req):
            if item is None:
                yield None
                continue
            name, data = item
            sequence = data["sequence_number"] + 1
            yield named_event(name, data)
    except errors.APIError as exc:
        yield error_event(exc, sequence)
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are sent: the error can only travel as an event
        log.exception("Stream failed")
        yield error_event(errors.from_exception(exc), sequence)

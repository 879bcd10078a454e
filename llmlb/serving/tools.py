"""Tool calls and structured outputs, engine-neutral: what the output must look like (a JSON
schema the engine constrains decoding to), the messages the chat template gets, and the tool
calls read back out of the generated text.

* ``tool_choice`` a named function: the output is that function's arguments (constrained to
  its ``parameters`` schema), so the call streams as it is generated.
* ``required``: the output is ``{"name": …, "arguments": …}`` for one of the tools
  (constrained to the union of their schemas).
* ``auto`` (the default with tools): the model writes what it likes; calls in the Hermes /
  Qwen format ``<tool_call>{"name": …, "arguments": …}</tool_call>`` (what the model's own
  template asks for, or llmlb's note for templates without tools), or a reply that is nothing
  but such a JSON object, become ``tool_calls``; anything else is the reply's content.
* ``none``: the tools are not offered; plain text.
* ``response_format`` ``json_object`` / ``json_schema``: the output is constrained to the schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from engines import grammar
from engines.textgen import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

from .. import errors
from .protocol import ChatRequest, NamedToolChoice

NONE, AUTO, REQUIRED, NAMED = "none", "auto", "required", "named"
#: what a "required" call cut short by max_tokens begins with (compact JSON, name first)
_PARTIAL_CALL = re.compile(r'\{"name":"([A-Za-z0-9_-]{1,64})","arguments":(.*)', re.DOTALL)
_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE)
                         + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class OutputPlan:
    """How one chat request's output is shaped and read back."""

    mode: str = NONE  # NONE | AUTO | REQUIRED | NAMED
    tools: tuple[dict, ...] = ()  # offered to the chat template
    function: str | None = None  # NAMED: the function called
    json_schema: dict | None = None  # the output is constrained to it
    parallel: bool = True
    names: frozenset[str] = field(default_factory=frozenset)

    @property
    def calls_tools(self) -> bool:
        return self.mode in (AUTO, REQUIRED, NAMED)


def _parameters(tool) -> dict:  # noqa: ANN001 - protocol.Tool
    return tool.function.parameters or {"type": "object", "properties": {}}


def plan(req: ChatRequest) -> OutputPlan:
    """Validate tools, tool_choice and response_format together; 400s name the field."""
    tools = req.tools or []
    choice = req.tool_choice
    if choice is not None and not tools:
        raise errors.invalid_request("'tool_choice' is only allowed when 'tools' are given",
                                     "tool_choice")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise errors.invalid_request("Invalid value for 'tools': function names must be "
                                     "unique", "tools")
    for i, tool in enumerate(tools):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise errors.invalid_request(f"Invalid value for 'tools[{i}].function.parameters'"
                                         ": it must be a JSON schema of type object",
                                         f"tools[{i}].function.parameters")
    offered = tuple(t.model_dump(exclude_none=True, by_alias=True) for t in tools)
    parallel = req.parallel_tool_calls is not False
    if tools and isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise errors.invalid_request(f"Invalid value for 'tool_choice': no tool is named "
                                         f"'{name}'", "tool_choice")
        tool = tools[names.index(name)]
        schema = _checked(_parameters(tool), f"tools[{names.index(name)}].function.parameters")
        return OutputPlan(NAMED, offered, name, schema, parallel, frozenset(names))
    if tools and choice == REQUIRED:
        schema = {"anyOf": [{"type": "object",
                             "properties": {"name": {"const": t.function.name},
                                            "arguments": _parameters(t)},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for t in tools]}
        schema = _checked(schema, "tools")
        return OutputPlan(REQUIRED, offered, None, schema, parallel, frozenset(names))
    schema = _response_schema(req)
    if tools and choice != NONE:
        return OutputPlan(AUTO, offered, None, schema, parallel, frozenset(names))
    return OutputPlan(NONE, (), None, schema)


def _response_schema(req: ChatRequest) -> dict | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise errors.missing_parameter("response_format.json_schema")
    return _checked(fmt.json_schema.schema_ or {}, "response_format.json_schema.schema")


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema: object) -> object:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    ``properties`` and says nothing about others — llama.cpp's grammar convention and what
    OpenAI's strict mode requires. Left open, a model may add keys no one asked for (a random
    one keeps inventing them); a schema that wants them says so."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(v) for v in out[key]]
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    return out


def _checked(schema: dict, param: str) -> dict:
    """The schema to constrain decoding with (``closed``); a 400 naming ``param`` when the
    grammar engine cannot compile it."""
    schema = closed(schema)  # type: ignore[assignment]
    problem = grammar.schema_problem(schema)
    if problem:
        raise errors.invalid_request(f"Invalid value for '{param}': this JSON schema cannot "
                                     f"be used for constrained decoding: {problem}", param)
    return schema


def template_messages(req: ChatRequest) -> list[dict]:
    """The messages as chat templates expect them: earlier calls' arguments as objects (what
    Hugging Face templates render), tool results with the id of the call they answer."""
    out = []
    for m in req.messages:
        message = m.model_dump(exclude_none=True)
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _as_object(c.function.arguments)}}
                for c in m.tool_calls]
            message.setdefault("content", "")
        out.append(message)
    return out


def _as_object(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: the template shows it as the client sent it


# --- reading calls back -----------------------------------------------------------------------

def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def read_calls(output: OutputPlan, text: str) -> tuple[str | None, list[dict]]:
    """The reply's content and tool calls from the whole generated text."""
    if output.mode == NAMED:
        return None, [tool_call(output.function or "", text)]
    if output.mode == REQUIRED:
        found = _call_object(text, output.names)
        if found is None:  # cut short by max_tokens: the name and what there is of arguments
            cut = _PARTIAL_CALL.match(text)
            return None, [tool_call(cut.group(1), cut.group(2)) if cut else tool_call("", "")]
        return None, [tool_call(*found)]
    if output.mode != AUTO:
        return text, []
    calls: list[dict] = []
    for match in _CALL_BLOCK.finditer(text):
        found = _call_object(match.group(1), output.names)
        if found is not None:
            calls.append(tool_call(*found))
    if not calls:
        found = _call_object(text, output.names)  # a reply that is just the call's JSON
        if found is None:
            return text, []
        calls.append(tool_call(*found))
        text = ""
    if not output.parallel:
        calls = calls[:1]
    content = _CALL_BLOCK.sub("", text).strip()
    return content or None, calls


def _call_object(text: str, names: frozenset[str]) -> tuple[str, str] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        return data["name"], arguments
    return data["name"], json.dumps(arguments, ensure_ascii=False)


def may_hold_call(text: str) -> int:
    """For streaming with ``auto``: the index from which ``text`` may be (the start of) a
    tool call and must be held back; ``len(text)`` when none of it can be."""
    at = text.find(TOOL_CALL_OPEN)
    if at >= 0:
        return at
    if not text.strip():
        return len(text)
    if text.lstrip().startswith("{"):  # the whole reply may be a call's JSON
        return 0
    for size in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)

"""Request types of the OpenAI endpoints, validated with pydantic; errors name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import errors
from ..config import OPTIONS_BY_ATTR, InferenceSettings

MAX_TOKENS_LIMIT = 1_000_000  # beyond any context window: larger is a client bug
MAX_STOP_SEQUENCES = 4
MAX_TOP_K = 1_000_000
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat (OpenAI); completions allow 5
MAX_TOOLS = 128  # OpenAI's limit


class _Request(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # extensions vLLM, llama.cpp's server and Ollama accept (-1 and 0 mean off for top_k)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or len(key) > 9:
                raise ValueError(f"keys must be token ids, not {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must lie in [-100, 100], not {bias}")
        if value and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call the assistant made in an earlier turn."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)  # how many alternatives per token

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    input: str | list[str] = Field()
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: None = Field(default=None, description="not supported")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("must not be empty")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


@dataclass(frozen=True)
class PromptLimits:
    """How big a prompt may be before anything tokenizes it (SC-1)."""

    max_chars: int = OPTIONS_BY_ATTR["max_prompt_chars"].default
    max_messages: int = OPTIONS_BY_ATTR["max_messages"].default

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> PromptLimits:
        return cls(settings.max_prompt_chars, settings.max_messages)

    def check_messages(self, body: dict) -> None:
        """Before parsing: a chat with too many messages costs nothing more to refuse."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_messages:
            raise errors.prompt_too_large("messages", len(messages), self.max_messages,
                                          "LLMLB_MAX_MESSAGES", "messages")

    def check_chars(self, texts: list[str], param: str) -> None:
        total = sum(len(t) for t in texts)
        if total > self.max_chars:
            raise errors.prompt_too_large("characters of prompt", total, self.max_chars,
                                          "LLMLB_MAX_PROMPT_CHARS", param)


def chat_texts(req: ChatRequest) -> list[str]:
    """Every string of a chat that reaches the tokenizer."""
    out: list[str] = []
    for m in req.messages:
        if isinstance(m.content, str):
            out.append(m.content)
        elif m.content:
            out.extend(part.text for part in m.content)
        if m.name:
            out.append(m.name)
        out.extend(call.function.arguments for call in m.tool_calls or ())
    # tool definitions reach the template too
    out.extend(json.dumps(t.function.model_dump(exclude_none=True, by_alias=True))
               for t in req.tools or ())
    return out


ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc: tuple[Any, ...]) -> str:
    """'messages[0].content' from pydantic's loc, dropping the union-member type tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out


def parse(cls: type[BaseModel], body: dict) -> Any:
    """Validate a JSON body; raise a 400 naming the first field at fault."""
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"]) or None
        if first["type"] == "missing":
            raise errors.missing_parameter(param) from None
        message = first["msg"].removeprefix("Value error, ")
        if param == "dimensions":
            message = "the dimensions parameter is not supported"
        raise errors.invalid_request(f"Invalid value for '{param}': {message}", param) from None

"""The OpenAI parameters agents and apps send (AP-5), through the official SDK (and LangChain)
against the tiny GGUF and safetensors models: tool calls and structured outputs by
constrained decoding, logprobs, penalties and logit bias; and a 400 naming the parameter for
what an engine cannot do.

The tiny models have random weights: they cannot choose a tool or write sensible JSON on
their own, so what these tests show is the mechanics — whatever such a model prefers, the
output validates against the schema, because the grammar leaves it no other choice.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from llmlb.serving import tools

from .conftest import HELLO, LiveServer, install

CONSTRAINED = ["gguf", "safetensors"]
MODEL_DIRS = ("gguf", "safetensors", "onnx")

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "description": "The forecast for a city",
                                            "parameters": WEATHER_ARGS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
    "required": ["zone"], "additionalProperties": False}}}

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 10},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {"type": "object", "properties": {
                    "country": {"enum": ["FR", "JP", "US"]},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["country", "zip"], "additionalProperties": False}},
                "required": ["name", "age", "address"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["person", "active"], "additionalProperties": False,
    },
    "enums_and_arrays": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]},
                      "minItems": 1, "maxItems": 4},
            "points": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                       "maximum": 9}},
                "required": ["x"], "additionalProperties": False}},
        },
        "required": ["colour", "sizes", "points"], "additionalProperties": False,
    },
}


@pytest.fixture
def models(server: LiveServer, long_models: dict[str, Path]) -> dict[str, str]:
    """The tiny Llama in three formats, with a context that holds tool definitions (the
    512-token one does not: its 512-token vocabulary spells JSON nearly byte by byte)."""
    return {fmt: install(server, long_models, fmt, f"tiny-{fmt}") for fmt in MODEL_DIRS}


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


# --- tool calls -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_a_named_tool_choice_gives_arguments_that_validate(server: LiveServer,
                                                           models: dict[str, str],
                                                           fmt: str) -> None:
    client = server.client()
    for temperature in (0, 1.2):  # greedy, and sampling with a seed
        reply = client.chat.completions.create(
            model=models[fmt], messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER, CLOCK], max_tokens=120, temperature=temperature, seed=7,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
        assert reply.usage.completion_tokens > 5  # counted, not guessed
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + \
            reply.usage.completion_tokens

    # tool_choice "required": one of the tools, its arguments valid for that tool
    reply = client.chat.completions.create(
        model=models[fmt], messages=HELLO, tools=[WEATHER, CLOCK], tool_choice="required",
        max_tokens=120, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    schemas = {"get_weather": WEATHER_ARGS, "get_time": CLOCK["function"]["parameters"]}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert reply.choices[0].finish_reason == "tool_calls"

    # the result goes back as a "tool" message after the assistant's call: a normal turn
    follow = client.chat.completions.create(
        model=models[fmt], tools=[WEATHER], max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name,
                              "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}],
        tool_choice="none")
    assert follow.choices[0].message.tool_calls is None
    assert follow.choices[0].finish_reason in ("length", "stop")
    # the earlier call reaches the prompt (this template has no tool_calls of its own: llmlb
    # writes the call into the assistant's turn)
    bare = client.chat.completions.create(
        model=models[fmt], max_tokens=1, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": ""},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}])
    assert follow.usage.prompt_tokens > bare.usage.prompt_tokens + 5


@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_streamed_tool_calls_reassemble_with_the_sdk_helpers(server: LiveServer,
                                                             models: dict[str, str],
                                                             fmt: str) -> None:
    client = server.client()
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        with client.beta.chat.completions.stream(
                model=models[fmt], messages=[{"role": "user", "content": "Weather?"}],
                tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=120, temperature=0,
                stream_options={"include_usage": True}) as stream:
            deltas = [event for event in stream if event.type == "tool_calls.function."
                      "arguments.delta"]
            final = stream.get_final_completion()
        (call,) = final.choices[0].message.tool_calls
        assert final.choices[0].finish_reason == "tool_calls"
        whole = client.chat.completions.create(
            model=models[fmt], messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=120, temperature=0)
        expected = whole.choices[0].message.tool_calls[0]
        assert (call.function.name, call.function.arguments) == (
            expected.function.name, expected.function.arguments)
        assert deltas, "the arguments arrive as argument deltas"
        if choice != "required":  # a named call streams its arguments token by token
            assert len(deltas) > 5
        assert final.usage.completion_tokens == whole.usage.completion_tokens
    # "auto": this model writes no call, so its text streams as content, the same as whole
    ask = {"model": models[fmt], "messages": HELLO, "tools": [WEATHER], "max_tokens": 30,
           "temperature": 0}
    whole = client.chat.completions.create(**ask)
    assert whole.choices[0].message.tool_calls is None
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


# --- structured outputs -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_json_schema_output_validates(server: LiveServer, models: dict[str, str],
                                      fmt: str) -> None:
    client = server.client()
    for name, schema in SCHEMAS.items():
        for seed in (1, 2):
            reply = client.chat.completions.create(
                model=models[fmt], messages=HELLO, max_tokens=200, temperature=1.0, seed=seed,
                response_format={"type": "json_schema", "json_schema": {
                    "name": name, "schema": schema, "strict": True}})
            text = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop", text
            jsonschema.validate(json.loads(text), schema)
    reply = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=60,
                                           temperature=0,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":  # an object may run past 60 tokens
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert reply.choices[0].message.content.startswith("{")


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]
    days: list[Literal["mon", "tue", "wed"]] = Field(max_length=3)


@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_the_sdk_parses_into_a_pydantic_model(server: LiveServer, models: dict[str, str],
                                              fmt: str) -> None:
    parsed = server.client().beta.chat.completions.parse(
        model=models[fmt], messages=HELLO, response_format=Forecast, max_tokens=120,
        temperature=0)
    forecast = parsed.choices[0].message.parsed
    assert isinstance(forecast, Forecast) and forecast.unit in ("celsius", "fahrenheit")


# --- logprobs and sampling --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [*CONSTRAINED, "onnx"])
def test_logprobs_have_the_right_shape(server: LiveServer, models: dict[str, str],
                                       fmt: str) -> None:
    client = server.client()
    reply = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 8
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert e.top_logprobs[0].token == e.token  # greedy: the best is the one chosen
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
        assert sum(2.718281828 ** t for t in tops) <= 1.0 + 1e-6
    # the same through a stream: each chunk's logprobs cover its tokens
    stream = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=3,
                                            stream=True)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in entries]
    # no logprobs asked: none given
    plain = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=3)
    assert plain.choices[0].logprobs is None
    # completions: the legacy shape
    done = client.completions.create(model=models[fmt], prompt="Hello", max_tokens=5,
                                     temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == done.choices[0].text
    assert all(len(t) <= 2 and max(t.values()) <= 0 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


@pytest.mark.parametrize("fmt", [*CONSTRAINED, "onnx"])
def test_penalties_and_logit_bias_change_greedy_output(server: LiveServer,
                                                       models: dict[str, str],
                                                       fmt: str) -> None:
    client = server.client()

    def tokens(**extra: object) -> list[str]:
        reply = client.chat.completions.create(model=models[fmt], messages=HELLO,
                                               max_tokens=24, temperature=0, logprobs=True,
                                               **extra)
        return [e.token for e in reply.choices[0].logprobs.content]

    base = tokens()
    assert len(set(base)) < len(base), "the tiny model repeats itself greedily"
    assert tokens() == base
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"extra_body": {"repetition_penalty": 1.8}}):
        changed = tokens(**extra)
        assert changed != base, extra
        assert len(set(changed)) >= len(set(base)), extra  # fewer repeats, not more
    # logit_bias -100 bans the greedy first token; +100 forces a chosen one
    first = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=1,
                                           temperature=0, logprobs=True, top_logprobs=2)
    top = first.choices[0].logprobs.content[0].top_logprobs
    assert tokens(logit_bias=_bias_for(server, models[fmt], top[0].token, -100))[0] != base[0]
    forced = tokens(logit_bias=_bias_for(server, models[fmt], top[1].token, 100))
    assert forced[0] == top[1].token


def _bias_for(server: LiveServer, model: str, token: str, bias: float) -> dict[str, float]:
    """The token id of ``token`` for a logit_bias (the tiny tokenizer's id, as a user would
    look it up with tiktoken for OpenAI's models)."""
    from tokenizers import Tokenizer

    path = next(server.models_dir.glob("tiny-safetensors/tokenizer.json"))
    token_id = Tokenizer.from_file(str(path)).encode(token, add_special_tokens=False).ids
    assert len(token_id) == 1, token
    return {str(token_id[0]): bias}


@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_top_k_and_min_p_narrow_sampling(server: LiveServer, models: dict[str, str],
                                         fmt: str) -> None:
    client = server.client()
    greedy = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=12,
                                            temperature=0).choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # only the best token is left: greedy
        hot = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=12,
                                             temperature=1.5, seed=3, extra_body=extra)
        assert hot.choices[0].message.content == greedy, extra


# --- batching: each sequence its own rules ------------------------------------------------

@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_each_sequence_of_a_batch_keeps_its_own_rules(server: LiveServer,
                                                      models: dict[str, str],
                                                      fmt: str) -> None:
    """Constrained, penalised, logprob-reporting and plain requests decoded together in one
    batch give what each gives alone (greedy): grammar and penalty state never leak."""
    client = server.client()
    asks = [
        {"response_format": {"type": "json_schema", "json_schema": {
            "name": name, "schema": schema}}} for name, schema in SCHEMAS.items()
    ] + [{"logprobs": True, "top_logprobs": 2, "frequency_penalty": 1.5}, {}]

    def run(extra: dict) -> tuple[str, list[str]]:
        reply = client.chat.completions.create(model=models[fmt], messages=HELLO,
                                               max_tokens=200, temperature=0, **extra)
        lp = reply.choices[0].logprobs
        return reply.choices[0].message.content, [e.token for e in lp.content] if lp else []

    alone = [run(extra) for extra in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(run, asks))
    assert together == alone
    for (text, _), schema in zip(together, SCHEMAS.values(), strict=False):
        jsonschema.validate(json.loads(text), schema)


def test_one_sequence_at_a_time_does_the_same(make_server, long_models: dict[str, Path],
                                              ) -> None:
    """safetensors without continuous batching (LLMLB_PARALLEL_SEQUENCES=1) samples through
    the serial runner: the same rules apply."""
    server = make_server(parallel_sequences=1)
    model = install(server, long_models, "safetensors", "tiny-serial")
    client = server.client()
    reply = client.chat.completions.create(
        model=model, messages=HELLO, tools=[WEATHER], max_tokens=120, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments),
                        WEATHER_ARGS)
    base = client.chat.completions.create(model=model, messages=HELLO, max_tokens=24,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(base.choices[0].logprobs.content) == 24
    penalised = client.chat.completions.create(model=model, messages=HELLO, max_tokens=24,
                                               temperature=0, presence_penalty=2)
    assert penalised.choices[0].message.content != base.choices[0].message.content


# --- what cannot be done: a 400 naming the parameter ---------------------------------------

def test_unsupported_and_malformed_parameters_are_400s(server: LiveServer,
                                                       models: dict[str, str]) -> None:
    client = server.client()
    onnx = models["onnx"]
    cases = [
        (onnx, {"tools": [WEATHER]}, "tools", "onnxruntime"),
        (onnx, {"response_format": {"type": "json_object"}}, "response_format", "onnxruntime"),
        (onnx, {"extra_body": {"top_k": 5}}, "top_k", "onnxruntime"),
        (onnx, {"extra_body": {"min_p": 0.1}}, "min_p", "onnxruntime"),
        (models["gguf"], {"tool_choice": "auto"}, "tool_choice", None),
        (models["gguf"], {"tools": [WEATHER], "tool_choice": {
            "type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
        (models["gguf"], {"tools": [{"type": "function", "function": {"name": "a b"}}]},
         "tools[0].function.name", None),
        (models["gguf"], {"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters", None),
        (models["gguf"], {"top_logprobs": 2}, "top_logprobs", None),
        (models["gguf"], {"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        (models["gguf"], {"logit_bias": {"x": 1}}, "logit_bias", None),
        (models["gguf"], {"frequency_penalty": 3}, "frequency_penalty", None),
        (models["gguf"], {"logit_bias": {"512": 5}}, "logit_bias", None),  # 512 tokens
        (models["safetensors"], {"logit_bias": {"99999": 5}}, "logit_bias", None),
        (models["gguf"], {"response_format": {"type": "json_schema"}},
         "response_format.json_schema", None),
        (models["safetensors"], {"n": 2}, "n", None),
    ]
    for model, extra, param, engine in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=2, **extra)
        error = _error(caught.value)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (
            extra, error)
        if engine:
            assert engine in error["message"] and param in error["message"], error
    # completions too
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=onnx, prompt="Hi", max_tokens=2,
                                  extra_body={"top_k": 3})
    assert _error(caught.value)["param"] == "top_k"
    # ONNX does what it can: penalties and logprobs
    reply = client.chat.completions.create(model=onnx, messages=HELLO, max_tokens=2,
                                           frequency_penalty=1, logprobs=True)
    assert len(reply.choices[0].logprobs.content) == 2


def test_engines_list_their_parameters(server: LiveServer) -> None:
    body = requests.get(f"{server.url}/v0/engines", timeout=10,
                        headers={"Authorization": "Bearer sk_debug"}).json()
    params = {row["name"]: set(row["parameters"]) for row in body["engines"]}
    for name in ("llama.cpp", "transformers"):
        assert {"tools", "response_format", "logprobs", "top_logprobs", "frequency_penalty",
                "presence_penalty", "logit_bias", "top_k", "min_p",
                "repetition_penalty"} <= params[name], name
    assert "tools" not in params["onnxruntime"] and "logprobs" in params["onnxruntime"]


# --- a client no one here wrote ------------------------------------------------------------

@pytest.mark.parametrize("fmt", CONSTRAINED)
def test_langchain_bind_tools_round_trip(server: LiveServer, models: dict[str, str],
                                         fmt: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time(zone: Literal["UTC", "CET", "JST"]) -> str:
        """The time now in a time zone."""
        return f"12:00 {zone}"

    llm = ChatOpenAI(model=models[fmt], base_url=f"{server.url}/v1", api_key="sk_debug",
                     temperature=0, max_tokens=40, max_retries=0)
    question = HumanMessage("What time is it in Tokyo?")
    asked = llm.bind_tools([get_time], tool_choice="get_time").invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET", "JST")
    answer = get_time.invoke(call["args"])
    reply = llm.bind_tools([get_time]).invoke(
        [question, asked, ToolMessage(answer, tool_call_id=call["id"])])
    assert isinstance(reply.content, str)
    assert reply.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


# --- reading calls the model wrote itself (tool_choice "auto") -----------------------------

def test_calls_in_the_hermes_format_are_read_back() -> None:
    plan = tools.OutputPlan(tools.AUTO, names=frozenset({"get_time", "get_weather"}))
    content, calls = tools.read_calls(plan, 'Sure.<tool_call>\n{"name": "get_time", '
                                      '"arguments": {"zone": "UTC"}}\n</tool_call>'
                                      '<tool_call>{"name": "get_weather", "arguments": '
                                      '{"city": "Oslo"}}</tool_call>')
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo"})]
    # a reply that is only the call's JSON; an unknown tool or broken JSON stays text
    assert tools.read_calls(plan, ' {"name": "get_time", "arguments": {}} ')[1]
    assert tools.read_calls(plan, '{"name": "rm_rf", "arguments": {}}')[1] == []
    assert tools.read_calls(plan, "<tool_call>{oops</tool_call>") == (
        "<tool_call>{oops</tool_call>", [])
    serial = tools.OutputPlan(tools.AUTO, names=plan.names, parallel=False)
    assert len(tools.read_calls(serial, '<tool_call>{"name": "get_time"}</tool_call>' * 2)[1]) \
        == 1
    # a "required" call cut short by max_tokens keeps its name and what it has of arguments
    required = tools.OutputPlan(tools.REQUIRED, names=plan.names)
    (cut,) = tools.read_calls(required, '{"name":"get_time","arguments":{"zo')[1]
    assert cut["function"] == {"name": "get_time", "arguments": '{"zo'}
    # streaming holds back exactly what may still become a call
    assert tools.may_hold_call("Hello <tool") == len("Hello ")
    assert tools.may_hold_call("Hello <b>") == len("Hello <b>")
    assert tools.may_hold_call("Hi <tool_call>{") == 3
    assert tools.may_hold_call('  {"name"') == 0

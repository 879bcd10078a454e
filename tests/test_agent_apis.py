"""The APIs coding agents speak (AG-1, AG-2), through their real clients against a standalone
llmlb with the tiny GGUF and safetensors models: the ``openai`` SDK's Responses API (create,
stream, previous_response_id, GET and DELETE), the OpenAI Agents SDK, and the ``anthropic``
SDK's Messages API (create, stream, tool use and results, count_tokens). The SDKs' own parsers
are the oracle: a stream they turn into the right final object is a right stream.

The tiny models have random weights; what shows is the mechanics (see
test_openai_features.py): tools and schemas hold because decoding is constrained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import anthropic
import jsonschema
import openai
import pytest
import requests

from llmlb.auth import create_api_key

from .conftest import LiveServer, install

FORMATS = ["gguf", "safetensors"]
WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0,
                                                 "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "The weather",
                  "parameters": WEATHER_ARGS}
GREEDY = {"temperature": 0}  # the anthropic SDK no longer names it; the API takes it
MESSAGES_TOOL = {"name": "get_weather", "description": "The weather",
                 "input_schema": WEATHER_ARGS}


@pytest.fixture
def models(server: LiveServer, long_models: dict[str, Path]) -> dict[str, str]:
    return {fmt: install(server, long_models, fmt, f"tiny-{fmt}") for fmt in FORMATS}


def claude(server: LiveServer, api_key: str = "sk_debug") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0,
                               timeout=120)


# --- Responses ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_responses_create_and_stream_with_the_openai_sdk(server: LiveServer,
                                                         models: dict[str, str],
                                                         fmt: str) -> None:
    client = server.client()
    reply = client.responses.create(model=models[fmt], instructions="Be brief.",
                                    input="Hello!", max_output_tokens=8)
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.status == "incomplete"  # the random model never stops before the limit
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text and reply.output[0].type == "message"
    assert reply.usage.output_tokens == 8 and reply.usage.input_tokens > 5
    assert reply.usage.total_tokens == reply.usage.input_tokens + 8

    # a JSON schema output, streamed: the SDK's parser builds the final response
    with client.responses.stream(model=models[fmt], input="Answer in JSON", text={"format": {
            "type": "json_schema", "name": "answer", "schema": ANSWER}},
            max_output_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert final.status == "completed"
    jsonschema.validate(json.loads(final.output_text), ANSWER)
    assert final.usage.output_tokens > 3

    # a forced function call, whole and streamed
    for streamed in (False, True):
        args = dict(model=models[fmt], input=[{"role": "user", "content": "Weather?"}],
                    tools=[RESPONSES_TOOL], max_output_tokens=80,
                    tool_choice={"type": "function", "name": "get_weather"})
        if streamed:
            with client.responses.stream(**args) as stream:
                deltas = [e for e in stream if e.type == "response.function_call_arguments.delta"]
                answer = stream.get_final_response()
            assert deltas
        else:
            answer = client.responses.create(**args)
        (call,) = answer.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id.startswith("call_") and answer.status == "completed"
        jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)

    # and the result of the call, sent back as the next turn's input
    follow = client.responses.create(model=models[fmt], tools=[RESPONSES_TOOL], input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        max_output_tokens=5)
    assert follow.usage.input_tokens > answer.usage.input_tokens


def test_previous_response_id_get_and_delete(server: LiveServer,
                                              models: dict[str, str]) -> None:
    client = server.client()
    model = models["gguf"]
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=6)
    second = client.responses.create(model=model, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=6)
    alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=6,
                                    store=False)
    # the whole first turn (its input and output) is the start of the second's prompt
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id

    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.role for i in items.data if i.type == "message"] == ["user", "assistant", "user"]

    # a stream's response is kept too, picked from its last event
    with client.responses.stream(model=model, input="Hi", max_output_tokens=4,
                                 previous_response_id=second.id) as stream:
        created = [e.response.id for e in stream if e.type == "response.created"]
    kept = client.responses.retrieve(created[0])
    assert kept.status == "incomplete" and kept.previous_response_id == second.id
    assert kept.usage.input_tokens > second.usage.input_tokens

    # another key sees none of them; store: false kept nothing
    other_key, _ = create_api_key(server.runtime.db, "other", "api")
    other = server.client(api_key=other_key)
    with pytest.raises(openai.NotFoundError) as info:
        other.responses.retrieve(first.id)
    assert info.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)
    with pytest.raises(openai.NotFoundError) as info:
        other.responses.create(model=model, input="?", previous_response_id=first.id)
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_the_agents_sdk_runs_a_function_tool(server: LiveServer,
                                            brief_models: dict[str, Path]) -> None:
    agents = pytest.importorskip("agents")
    model_id = install(server, brief_models, "gguf", "tiny-brief")
    called: list[dict] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
        """The weather in a city."""
        called.append({"city": city})
        return "Sunny"

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk_debug",
                                max_retries=0, timeout=120)
    agent = agents.Agent(
        name="forecaster", instructions="Use the tool.", tools=[get_weather],
        model=agents.OpenAIResponsesModel(model_id, client),
        model_settings=agents.ModelSettings(tool_choice="get_weather"))
    result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=4,
                                    run_config=agents.RunConfig(tracing_disabled=True))
    assert called == [{"city": "Paris"}] or called == [{"city": "Tokyo"}]
    calls = [i for i in result.new_items if i.type == "tool_call_item"]
    outputs = [i for i in result.new_items if i.type == "tool_call_output_item"]
    assert len(calls) == 1 and outputs[0].output == "Sunny"
    assert isinstance(result.final_output, str)


# --- Messages -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_messages_with_the_anthropic_sdk(server: LiveServer, models: dict[str, str],
                                         fmt: str) -> None:
    client = claude(server)
    hello = [{"role": "user", "content": "Hello!"}]
    reply = client.messages.create(model=models[fmt], max_tokens=8, system="Be brief.",
                                   messages=hello, extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.stop_reason == "max_tokens" and reply.content[0].type == "text"
    assert reply.usage.output_tokens == 8 and reply.usage.input_tokens > 5

    with client.messages.stream(model=models[fmt], max_tokens=8, system="Be brief.",
                                messages=hello, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == reply.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == reply.usage.input_tokens
    assert final.usage.output_tokens == 8

    # a stop sequence: the greedy answer ends where it would have written it
    stop = reply.content[0].text[3:5]
    stopped = client.messages.create(model=models[fmt], max_tokens=8, system="Be brief.",
                                     messages=hello, stop_sequences=[stop], extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert reply.content[0].text.startswith(stopped.content[0].text if stopped.content else "")

    # forced tool use, whole and streamed, then its result as the next turn
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    for streamed in (False, True):
        args = dict(model=models[fmt], max_tokens=80, tools=[MESSAGES_TOOL], messages=ask,
                    tool_choice={"type": "tool", "name": "get_weather"})
        if streamed:
            with client.messages.stream(**args) as stream:
                used = stream.get_final_message()
        else:
            used = client.messages.create(**args)
        assert used.stop_reason == "tool_use"
        (block,) = used.content
        assert block.type == "tool_use" and block.name == "get_weather"
        assert block.id.startswith("toolu_")
        jsonschema.validate(block.input, WEATHER_ARGS)
    follow = client.messages.create(model=models[fmt], max_tokens=5, tools=[MESSAGES_TOOL],
                                    messages=[*ask, {"role": "assistant", "content": used.content},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": block.id,
                                                   "content": "Sunny, 21 C"}]}])
    assert follow.content[0].type == "text"
    assert follow.usage.input_tokens > used.usage.input_tokens

    # any tool ("any"): one of them, with valid arguments
    anyone = client.messages.create(model=models[fmt], max_tokens=80, tools=[MESSAGES_TOOL],
                                    messages=ask, tool_choice={"type": "any"})
    assert anyone.content[-1].type == "tool_use"
    jsonschema.validate(anyone.content[-1].input, WEATHER_ARGS)

    # count_tokens: what the model will read, as the answer's usage says
    counted = client.messages.count_tokens(model=models[fmt], system="Be brief.",
                                           messages=hello)
    assert counted.input_tokens == reply.usage.input_tokens


def test_messages_structured_output(server: LiveServer, models: dict[str, str]) -> None:
    client = claude(server)
    reply = client.messages.create(
        model=models["gguf"], max_tokens=60, messages=[{"role": "user", "content": "JSON!"}],
        output_config={"format": {"type": "json_schema", "schema": ANSWER}})
    jsonschema.validate(json.loads(reply.content[0].text), ANSWER)


def test_messages_auth_and_errors_take_anthropics_shape(server: LiveServer,
                                                       models: dict[str, str]) -> None:
    hello = [{"role": "user", "content": "Hi"}]
    # Claude Code's request line and headers: ?beta=true, anthropic-version, x-api-key
    r = requests.post(f"{server.url}/v1/messages?beta=true", timeout=60, json={
        "model": models["gguf"], "max_tokens": 3, "messages": hello},
        headers={"x-api-key": "sk_debug", "anthropic-version": "2023-06-01",
                 "anthropic-beta": "claude-code-20250219"})
    assert r.status_code == 200 and r.json()["type"] == "message"

    with pytest.raises(anthropic.AuthenticationError) as auth:
        claude(server, api_key="sk-wrong").messages.create(model=models["gguf"], max_tokens=3,
                                                           messages=hello)
    assert auth.value.body["type"] == "error"
    assert auth.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude(server).messages.create(model="no-such-model", max_tokens=3, messages=hello)
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude(server).messages.create(model=models["gguf"], messages=hello,
                                       max_tokens=None)  # type: ignore[arg-type]
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as unreadable:
        claude(server).messages.create(model=models["gguf"], max_tokens=3, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}])
    assert "messages[0].content[0]" in unreadable.value.body["error"]["message"]
    for path, status in (("/v1/messages/nothing", 404), ("/v1/messages", 401)):
        r = requests.post(server.url + path, json={}, timeout=10)
        assert r.status_code == status
        assert r.json()["type"] == "error" and set(r.json()["error"]) >= {"type", "message"}
    r = requests.get(f"{server.url}/v1/messages", timeout=10,
                     headers={"x-api-key": "sk_debug"})
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    # the chat API keeps OpenAI's shape
    r = requests.post(f"{server.url}/v1/chat/completions", json={}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# --- hints, and what cannot be honoured ---------------------------------------------------

def test_hints_are_accepted_and_hosted_tools_not_offered(server: LiveServer,
                                                        models: dict[str, str],
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    caplog.set_level(logging.WARNING, logger="llmlb")
    client = server.client()
    namespace = {"type": "namespace", "name": "weather", "description": "Weather tools",
                 "tools": [RESPONSES_TOOL]}
    # what Codex sends besides the input: all hints, and a hosted tool llmlb cannot run
    answer = client.responses.create(
        model=models["gguf"], input=[{"type": "message", "role": "developer", "content": [
            {"type": "input_text", "text": "You are a coding agent."}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Weather?"}]}],
        tools=[namespace, {"type": "web_search"}], parallel_tool_calls=True, store=False,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80,
        reasoning={"effort": "high", "summary": "auto"}, include=["reasoning.encrypted_content"],
        prompt_cache_key="abc", extra_body={"client_metadata": {"session_id": "s"}})
    (call,) = answer.output
    assert call.type == "function_call" and call.namespace == "weather"
    assert "web_search" in caplog.text and "Not offered" in caplog.text

    # what Claude Code sends besides the messages
    claude(server).messages.create(
        model=models["gguf"], max_tokens=3, metadata={"user_id": "u"},
        system=[{"type": "text", "text": "You are Claude Code.",
                 "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                                                "cache_control": {"type": "ephemeral"}}]}],
        tools=[MESSAGES_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
        extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
                    "context_management": {"edits": [{"type": "clear_thinking_20251015",
                                                      "keep": "all"}]}})

    # what would change the answer and cannot be honoured: a 400 naming it
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=models["gguf"], input="hi", background=True)
    assert info.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=models["gguf"], input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.invalid/x.png"}]}])
    assert info.value.body["param"] == "input[0].content[0]"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=models["gguf"], input="hi", max_output_tokens=0)
    assert info.value.body["param"] == "max_output_tokens"


def test_a_prompt_over_the_context_is_a_400_naming_both_numbers(make_server,
                                                               long_models) -> None:
    server = make_server(context_length=256)
    model = install(server, long_models, "gguf", "tiny-gguf")
    long = "word " * 400
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(server).messages.create(model=model, max_tokens=5,
                                       messages=[{"role": "user", "content": long}])
    message = info.value.body["error"]["message"]
    assert message.startswith("prompt is too long: ") and "> 256 maximum" in message
    assert "LLMLB_CONTEXT_LENGTH" in message
    with pytest.raises(openai.BadRequestError) as info:
        server.client().responses.create(model=model, input=long)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "> 256 maximum" in info.value.body["message"]

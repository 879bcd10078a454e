"""The Responses and Messages APIs through a balancer (AG-3): `llmlb serve --role balancer`
and `llmlb node` processes; the node frames the dialect, the balancer passes its bytes
through with the same routing, failover, history and ``X-LLMLB-Node`` as chat, and keeps the
stored responses (the node keeps none)."""

from __future__ import annotations

import json
import signal
import time
from typing import Literal

import anthropic
import openai
import pytest
import requests

from .test_balancer import bearer, cluster  # noqa: F401 - the fixture

CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
        "required": ["city"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _history(c, operation: str, count: int) -> list[dict]:  # noqa: ANN001 - Cluster
    deadline = time.monotonic() + 30
    while True:
        rows = requests.get(f"{c.url}/v0/requests", headers=bearer(c.admin),
                            timeout=10).json()["data"]
        found = [r for r in rows if r["operation"] == operation]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("fmt", ["llama-gguf", "llama-st"])
def test_responses_and_messages_through_a_balancer_to_a_node(cluster, fmt: str) -> None:  # noqa: F811
    c = cluster()
    c.start_node("node-a", {"tiny": fmt})
    client = c.client()
    raw = client.responses.with_raw_response.create(model="tiny", input="Hello!",
                                                    max_output_tokens=6)
    assert raw.headers["X-LLMLB-Node"] == "node-a"
    first = raw.parse()
    assert first.output_text and first.usage.output_tokens == 6
    with client.responses.stream(model="tiny", input="JSON please", max_output_tokens=40,
                                 previous_response_id=first.id, text={"format": {
                                     "type": "json_schema", "name": "a", "schema": ANSWER}}
                                 ) as stream:
        for _ in stream:
            pass
        second = stream.get_final_response()
    assert json.loads(second.output_text) in ({"ok": True}, {"ok": False})
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # the balancer keeps both; the node kept nothing
    assert client.responses.retrieve(second.id).previous_response_id == first.id
    node_url = c.nodes_json()["node-a"]["url"]
    r = requests.get(f"{node_url}/v1/responses/{first.id}",
                     headers=bearer(c.node_secret("node-a")), timeout=10)
    assert r.status_code == 404

    claude = anthropic.Anthropic(base_url=c.url, api_key=c.api, max_retries=0, timeout=120)
    reply = claude.messages.with_raw_response.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert reply.headers["X-LLMLB-Node"] == "node-a"
    with claude.messages.stream(model="tiny", max_tokens=7,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 7 and final.stop_reason == "max_tokens"
    assert claude.messages.count_tokens(model="tiny", messages=[
        {"role": "user", "content": "Hi"}]).input_tokens == final.usage.input_tokens
    # forced tool use and its result, as Claude Code sends them
    tool = {"name": "get_weather", "input_schema": CITY}
    ask = [{"role": "user", "content": "Weather?"}]
    used = claude.messages.create(model="tiny", max_tokens=40, tools=[tool], messages=ask,
                                  tool_choice={"type": "tool", "name": "get_weather"})
    (block,) = used.content
    assert used.stop_reason == "tool_use" and block.input["city"] in ("Paris", "Tokyo")
    follow = claude.messages.create(model="tiny", max_tokens=3, tools=[tool], messages=[
        *ask, {"role": "assistant", "content": used.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                      "content": "Sunny"}]}])
    assert follow.usage.input_tokens > used.usage.input_tokens

    # the Agents SDK: its Runner calls the function the model chose
    agents = pytest.importorskip("agents")

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    agent = agents.Agent(
        name="forecaster", tools=[get_weather], tool_use_behavior="stop_on_first_tool",
        model=agents.OpenAIResponsesModel("tiny", openai.AsyncOpenAI(
            base_url=f"{c.url}/v1", api_key=c.api, max_retries=0, timeout=120)),
        model_settings=agents.ModelSettings(tool_choice="get_weather", max_tokens=40))
    result = agents.Runner.run_sync(agent, "Weather?", max_turns=2,
                                    run_config=agents.RunConfig(tracing_disabled=True))
    assert result.final_output in ("Sunny in Paris", "Sunny in Tokyo")

    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nope", max_tokens=5,
                               messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["type"] == "error"

    # the history counts their tokens as the dialects report them
    responses = _history(c, "responses", 3)
    assert (False, 6) in {(r["stream"], r["tokens_out"]) for r in responses}
    assert all(r["node"] == "node-a" and r["tokens_in"] for r in responses)
    messages = _history(c, "messages", 5)
    assert {(r["stream"], r["tokens_out"]) for r in messages if r["status"] == 200} >= \
        {(False, 5), (True, 7), (False, 3)}


def test_a_dialect_stream_of_a_dying_node_ends_with_its_error_event(cluster) -> None:  # noqa: F811
    c = cluster()
    c.start_node("node-a", {"snail": "slow:0.1"})
    r = requests.post(f"{c.url}/v1/messages", headers={"x-api-key": c.api}, stream=True,
                      json={"model": "snail", "max_tokens": 100, "stream": True,
                            "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
    assert r.status_code == 200 and r.headers["X-LLMLB-Node"] == "node-a"
    events = []
    for line in r.iter_lines():
        if line.startswith(b"event: "):
            events.append(line[7:].decode())
            if events.count("content_block_delta") == 3:
                c.nodes["node-a"].stop(signal.SIGKILL)
        elif line.startswith(b"data: ") and events[-1] == "error":
            error = json.loads(line[6:])
    assert events[-1] == "error" and "message_stop" not in events
    assert error["type"] == "error" and "node-a" in error["error"]["message"]
    # the SDK turns it into an exception, as Anthropic's own errors
    c.start_node("node-b", {"snail": "slow:0.1"})
    claude = anthropic.Anthropic(base_url=c.url, api_key=c.api, max_retries=0, timeout=60)
    with pytest.raises(anthropic.APIStatusError) as info, claude.messages.stream(
            model="snail", max_tokens=100, messages=[{"role": "user", "content": "Hi"}],
    ) as stream:
        for i, _ in enumerate(stream.text_stream):
            if i == 2:
                c.nodes["node-b"].stop(signal.SIGKILL)
    assert "node-b" in str(info.value)

    # the Responses API's stream ends with its "error" event
    c.start_node("node-c", {"snail": "slow:0.1"})
    client = c.client(timeout=60)
    kinds = []
    with client.responses.stream(model="snail", input="Hi", max_output_tokens=100) as stream:
        for event in stream:
            kinds.append(event.type)
            if kinds.count("response.output_text.delta") == 3:
                c.nodes["node-c"].stop(signal.SIGKILL)
    assert kinds[-1] == "error" and "response.completed" not in kinds


def test_affinity_keeps_an_agent_conversation_on_its_node(cluster) -> None:  # noqa: F811
    c = cluster()
    c.start_node("node-a", {"tiny": "llama-gguf"})
    c.start_node("node-b", {"tiny": "llama-gguf"})
    claude = anthropic.Anthropic(base_url=c.url, api_key=c.api, max_retries=0, timeout=120)
    client = c.client()
    used: set[str] = set()
    for n in range(6):
        messages = [{"role": "user", "content": f"Conversation {n}: tell me about Paris."}]
        by_messages, by_responses, previous = [], [], None
        for turn in range(3):
            raw = claude.messages.with_raw_response.create(
                model="tiny", system="You are terse.", messages=messages, max_tokens=3)
            by_messages.append(raw.headers["X-LLMLB-Node"])
            messages = [*messages, {"role": "assistant", "content": raw.parse().content},
                        {"role": "user", "content": f"And turn {turn + 2}?"}]
            # turns chained by previous_response_id: the balancer expands them, so each
            # starts with the first turn's input, and goes where that one went
            answer = client.responses.with_raw_response.create(
                model="tiny", instructions="You are terse.", max_output_tokens=3,
                input=f"Conversation {n}, turn {turn}", previous_response_id=previous)
            by_responses.append(answer.headers["X-LLMLB-Node"])
            previous = answer.parse().id
        assert len(set(by_messages)) == 1, f"conversation {n} moved: {by_messages}"
        assert len(set(by_responses)) == 1, f"conversation {n} moved: {by_responses}"
        used |= set(by_messages) | set(by_responses)
    assert used == {"node-a", "node-b"}  # conversations spread over the nodes

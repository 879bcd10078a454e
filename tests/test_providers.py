"""Hosted providers by prefix (AG-4): ``openai:``, ``anthropic:`` and ``google:`` model names
reach the provider with the balancer's key, from chat completions, the Responses API and the
Messages API, streaming and tool calls included, translated both ways where the provider
speaks another API; counted under the provider's name, cooled down and failed over like any
member; a provider without a key is a 404 naming the variable to set; the key goes to the
provider's base URL and nowhere else. The providers are stand-ins on loopback
(``tests/fake_openai.py``, ``tests/fake_providers.py``); the clients the real SDKs."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import requests

from .conftest import HELLO
from .fake_openai import FakeOpenAI
from .fake_providers import FakeAnthropic, FakeGemini
from .test_aliases import put
from .test_endpoints import ADMIN, FAST, nodes, wait_for

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CLAUDE_TOOLS = [{"name": "get_weather", "description": "The weather in a city",
                 "input_schema": WEATHER[0]["function"]["parameters"]}]


@pytest.fixture
def providers():
    """The three stand-ins, each with its own key."""
    with FakeOpenAI("openai", ("gpt-test",), api_key="sk-openai-secret", tokens=3,
                    native=("responses",)) as oai, \
            FakeAnthropic("sk-ant-secret", ("claude-test",)) as ant, \
            FakeGemini("goog-secret", ("gemini-test",)) as gem:
        yield oai, ant, gem


def keyed(oai, ant, gem) -> dict:  # noqa: ANN001
    return {"openai_api_key": "sk-openai-secret", "openai_base_url": oai.url,
            "anthropic_api_key": "sk-ant-secret", "anthropic_base_url": ant.url,
            "google_api_key": "goog-secret", "google_base_url": gem.url,
            "provider_check_seconds": 0.2}


def claude_client(server) -> anthropic.Anthropic:  # noqa: ANN001
    return anthropic.Anthropic(base_url=server.url, api_key="sk_debug", max_retries=0)


def test_a_provider_without_a_key_is_a_404_naming_the_variable(make_server) -> None:
    server = make_server(role="balancer")
    client = server.client()
    for model, variable in (("openai:gpt-4o", "OPENAI_API_KEY"),
                            ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
                            ("google:gemini-2.5-flash", "GOOGLE_API_KEY")):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=model, messages=HELLO)
        assert info.value.body["code"] == "provider_not_configured"
        assert variable in info.value.body["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client(server).messages.create(model="anthropic:claude-sonnet-4-5",
                                              max_tokens=5, messages=HELLO)
    assert missing.value.body["type"] == "error"
    assert "ANTHROPIC_API_KEY" in missing.value.body["error"]["message"]
    assert client.models.list().data == []
    assert "openai" not in nodes(server)


def test_openai_by_prefix(make_server, providers) -> None:
    oai, ant, gem = providers
    server = make_server(**FAST, **keyed(oai, ant, gem))
    client = server.client()
    raw = client.chat.completions.with_raw_response.create(model="openai:gpt-test",
                                                           messages=HELLO)
    assert raw.headers["X-LLMLB-Node"] == "openai"
    assert raw.parse().choices[0].message.content == "hello from openai"
    assert oai.paths[-1] == "/v1/chat/completions" and oai.calls[-1]["model"] == "gpt-test"
    assert oai.headers[-1]["authorization"] == "Bearer sk-openai-secret"
    chunks = list(client.chat.completions.create(model="openai:gpt-test", messages=HELLO,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "t0 t1 t2 "
    assert all(c.usage is None for c in chunks)  # the usage llmlb asked for, taken out again

    # the Responses API is OpenAI's own: it goes as sent (previous_response_id expanded)
    answer = client.responses.create(model="openai:gpt-test", input="Hi")
    assert answer.output_text == "hello from openai" and oai.paths[-1] == "/v1/responses"
    follow = client.responses.create(model="openai:gpt-test", input="And then?",
                                     previous_response_id=answer.id)
    sent = oai.calls[-1]
    assert "previous_response_id" not in sent and sent["model"] == "gpt-test"
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]
    assert follow.output_text == "hello from openai"
    with client.responses.stream(model="openai:gpt-test", input="Hi") as stream:
        assert stream.get_final_response().output_text == "hello from openai"

    # the Messages API reaches it as chat completions
    message = claude_client(server).messages.create(model="openai:gpt-test", max_tokens=7,
                                                    system="Be brief.", messages=HELLO)
    assert message.content[0].text == "hello from openai"
    assert oai.paths[-1] == "/v1/chat/completions"
    assert oai.calls[-1]["messages"][0] == {"role": "system", "content": "Be brief."}

    # listed once its models are known; counted under its name
    listed = wait_for(lambda: [m.id for m in client.models.list().data if
                               m.id.startswith("openai:")])
    assert listed == ["openai:gpt-test"]
    row = nodes(server)["openai"]
    assert row["kind"] == "provider" and row["api_key_env"] == "OPENAI_API_KEY"
    assert row["url"] == oai.url
    rows = wait_for(lambda: [r for r in server.runtime.history.query(node="openai", limit=50)
                             if r["operation"] == "messages"], timeout=30)
    assert rows and rows[0]["status"] == 200 and rows[0]["model"] == "openai:gpt-test"
    assert all(h.get("authorization") != "Bearer sk_debug" for h in oai.headers)


def test_anthropic_by_prefix(make_server, providers) -> None:
    oai, ant, gem = providers
    server = make_server(**FAST, **keyed(oai, ant, gem))
    claude = claude_client(server)

    # its own API: the request as sent, with the client's version and betas
    message = claude.messages.create(
        model="anthropic:claude-test", max_tokens=50, messages=HELLO,
        extra_headers={"anthropic-beta": "context-management-2025-06-27"})
    assert message.content[0].text == "hello from anthropic"
    path, sent = ant.calls[-1]
    assert path.startswith("/v1/messages") and sent["model"] == "claude-test"
    assert sent["messages"] == HELLO and sent["max_tokens"] == 50
    assert ant.post_headers[-1]["x-api-key"] == "sk-ant-secret"
    assert ant.post_headers[-1]["anthropic-beta"] == "context-management-2025-06-27"
    with claude.messages.stream(model="anthropic:claude-test", max_tokens=50,
                                messages=ASK, tools=CLAUDE_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[1].input == {"city": "Paris"}
    counted = claude.messages.count_tokens(model="anthropic:claude-test", messages=HELLO)
    assert counted.input_tokens == 11 and ant.calls[-1][0] == "/v1/messages/count_tokens"
    # the history has both counts of the stream (the prompt's from its first event)
    rows = wait_for(lambda: [r for r in server.runtime.history.query(node="anthropic")
                             if r["stream"]], timeout=30)
    assert (rows[0]["tokens_in"], rows[0]["tokens_out"]) == (10, 3)

    # chat completions, translated to Messages and back: a forced tool, its result
    client = server.client()
    answer = client.chat.completions.create(
        model="anthropic:claude-test", messages=[{"role": "system", "content": "Be brief."},
                                                 *ASK],
        tools=WEATHER, tool_choice="required")
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == \
        {"city": "Paris"}
    sent = ant.calls[-1][1]
    assert sent["system"] == "Be brief." and sent["tool_choice"] == {"type": "any"}
    assert sent["tools"][0]["input_schema"] == WEATHER[0]["function"]["parameters"]
    assert sent["max_tokens"] == 4096  # Anthropic needs a limit: llmlb's default
    follow = client.chat.completions.create(
        model="anthropic:claude-test", max_tokens=20, tools=WEATHER,
        messages=[*ASK, answer.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == "it is sunny"
    assert follow.usage.prompt_tokens == 10 and follow.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="anthropic:claude-test", messages=ASK,
                                            tools=WEATHER, stream=True)
    pieces = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(p.content or "" for p in pieces) == "Let me look."
    arguments = "".join(t.function.arguments or "" for p in pieces for t in p.tool_calls or ())
    assert json.loads(arguments) == {"city": "Paris"}

    # the Responses API, through chat completions
    response = client.responses.create(model="anthropic:claude-test", input="Hi",
                                       instructions="Be kind.")
    assert response.output_text == "hello from anthropic"
    assert ant.calls[-1][1]["system"] == "Be kind."
    with client.responses.stream(model="anthropic:claude-test", input=ASK[0]["content"],
                                 tools=[{"type": "function", "name": "get_weather",
                                         "parameters": WEATHER[0]["function"]["parameters"]}],
                                 ) as events:
        done = events.get_final_response()
    assert [item.type for item in done.output] == ["message", "function_call"]
    assert json.loads(done.output[1].arguments) == {"city": "Paris"}

    # its errors in the client's API; completions have no equivalent there
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="anthropic:claude-test", prompt="Hi")
    assert info.value.body["code"] == "unsupported_operation"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="anthropic:claude-nope", messages=HELLO)


def test_google_by_prefix(make_server, providers) -> None:
    oai, ant, gem = providers
    server = make_server(**FAST, **keyed(oai, ant, gem))
    client = server.client()
    answer = client.chat.completions.create(
        model="google:gemini-test", temperature=0.2, max_tokens=30,
        messages=[{"role": "system", "content": "Be brief."}, *HELLO])
    assert answer.choices[0].message.content == "hello from gemini"
    assert answer.usage.prompt_tokens == 9 and answer.usage.completion_tokens == 4
    path, sent = gem.calls[-1]
    assert path == "/v1beta/models/gemini-test:generateContent"
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 30}
    assert gem.post_headers[-1]["x-goog-api-key"] == "goog-secret"
    chunks = list(client.chat.completions.create(model="google:gemini-test", messages=HELLO,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "hello from gemini"
    assert gem.calls[-1][0].endswith(":streamGenerateContent?alt=sse")

    # a tool call and its result: the thought signature goes back with the call
    called = client.chat.completions.create(model="google:gemini-test", messages=ASK,
                                            tools=WEATHER, tool_choice="required")
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert gem.calls[-1][1]["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    follow = client.chat.completions.create(
        model="google:gemini-test", tools=WEATHER,
        messages=[*ASK, called.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.choices[0].message.content == "it is sunny"
    turns = gem.calls[-1][1]["contents"]
    assert [t["role"] for t in turns] == ["user", "model", "user"]
    assert turns[2]["parts"] == [{"functionResponse": {"name": "get_weather",
                                                       "response": {"result": "sunny"}}}]

    # the Messages API and the Responses API, through chat completions, streams included
    claude = claude_client(server)
    message = claude.messages.create(model="google:gemini-test", max_tokens=20,
                                     messages=ASK, tools=CLAUDE_TOOLS)
    assert message.stop_reason == "tool_use" and message.content[0].input == {"city": "Paris"}
    with claude.messages.stream(model="google:gemini-test", max_tokens=20,
                                messages=HELLO) as stream:
        assert "".join(stream.text_stream) == "hello from gemini"
    response = client.responses.create(model="google:gemini-test", input="Hi")
    assert response.output_text == "hello from gemini"
    with client.responses.stream(model="google:gemini-test", input="Hi") as events:
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "hello from gemini" and len(deltas) == 3
    counted = claude.messages.count_tokens(model="google:gemini-test", messages=HELLO)
    assert counted.input_tokens == 7 and gem.calls[-1][0].endswith(":countTokens")
    listed = wait_for(lambda: [m.id for m in client.models.list().data
                               if m.id.startswith("google:")])
    assert listed == ["google:gemini-test"]  # what cannot generate content is left out

    # Gemini's errors in the client's API, its status kept
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="google:gemini-nope", max_tokens=5, messages=HELLO)
    assert "gemini-nope" in info.value.body["error"]["message"]


def test_a_failing_provider_cools_down_and_an_alias_moves_on(make_server, providers) -> None:
    oai, ant, gem = providers
    server = make_server(**{**FAST, **keyed(oai, ant, gem), "cooldown_max_seconds": 30})
    client = server.client()
    ant.fault = "429"
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="anthropic:claude-test", messages=HELLO)
    assert info.value.response.headers["Retry-After"] == "7"
    calls = len(ant.calls)
    with pytest.raises(openai.APIStatusError) as cooling:  # cooling down: not even asked
        client.chat.completions.create(model="anthropic:claude-test", messages=HELLO)
    assert cooling.value.status_code == 503
    assert cooling.value.body["code"] == "no_node_available" and len(ant.calls) == calls
    assert nodes(server)["anthropic"]["status"] == "cooldown"

    # an alias takes the next model when one fails before the first byte
    assert put(server, "claude-sonnet-4-5", ["anthropic:claude-test",
                                             "google:gemini-test"]).status_code == 200
    raw = claude_client(server).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=9, messages=HELLO)
    assert raw.headers["X-LLMLB-Node"] == "google"
    assert raw.parse().content[0].text == "hello from gemini"

    # a key the provider refuses: 503 saying what to check, never the client's 401
    with FakeGemini("another-key", ("gemini-test",)) as wrong:
        other = make_server(**FAST, google_api_key="goog-secret", google_base_url=wrong.url)
        with pytest.raises(openai.APIStatusError) as refused:
            other.client().chat.completions.create(model="google:gemini-test",
                                                   messages=HELLO)
    assert refused.value.status_code == 503
    assert "google refused the balancer's credentials" in refused.value.body["message"]


def test_the_key_goes_to_the_providers_base_url_only(make_server, providers) -> None:
    oai, ant, gem = providers
    with FakeOpenAI("elsewhere", ("gpt-test",)) as elsewhere:
        server = make_server(**FAST, openai_api_key="sk-openai-secret",
                             openai_base_url=oai.url)
        # a row of the shared state pointed elsewhere (another balancer, a tampered
        # database) moves nothing: the URL and key are this balancer's own settings
        server.runtime.db.engine.execute("UPDATE nodes SET url = ? WHERE name = 'openai'",
                                         (elsewhere.url,))
        server.runtime.registry.nodes(fresh=True)
        client = server.client()
        assert client.chat.completions.create(model="openai:gpt-test",
                                              messages=HELLO).choices[0].message.content \
            == "hello from openai"
        assert elsewhere.calls == [] and elsewhere.headers == []
        # a node cannot take a provider's name
        r = requests.post(f"{server.url}/v0/nodes", headers=ADMIN, timeout=10,
                          json={"name": "openai", "url": elsewhere.url, "report": {},
                                "secret": "a-node-of-its-own-0123"})
        assert r.status_code == 409 and "hosted provider" in r.json()["error"]["message"]

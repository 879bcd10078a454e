"""The Responses and Messages APIs on external endpoints (AG-3): an endpoint that serves an
API itself gets the request as the client sent it; one that does not gets it translated to
chat completions by the balancer, and the answer translated back, streaming included. The
endpoints are ``tests/fake_openai.py`` servers on loopback; the clients the real SDKs."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest

from .test_endpoints import FAST, add


def test_an_endpoint_without_the_apis_gets_them_translated(make_server, fakes) -> None:  # noqa: F811
    fake = fakes("plain", "plain-model", tokens=4)
    server = make_server(**FAST)
    assert add(server, "plain", fake.url).status_code == 201
    client = server.client()

    raw = client.responses.with_raw_response.create(model="plain-model", input="Hi",
                                                    instructions="Be kind.")
    assert raw.headers["X-LLMLB-Node"] == "plain"
    answer = raw.parse()
    assert answer.output_text == "hello from plain" and answer.status == "completed"
    assert answer.usage.input_tokens == 5 and answer.usage.output_tokens == 4
    sent = fake.calls[-1]
    assert fake.paths[-1] == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": "Hi"}]
    follow = client.responses.create(model="plain-model", input="And then?",
                                     previous_response_id=answer.id)
    assert follow.previous_response_id == answer.id
    assert [m["content"] for m in fake.calls[-1]["messages"]] == ["Hi", "hello from plain",
                                                                  "And then?"]
    with client.responses.stream(model="plain-model", input="Hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["t0 ", "t1 ", "t2 ", "t3 "] and final.output_text == "t0 t1 t2 t3 "
    assert final.usage.output_tokens == 4

    claude = anthropic.Anthropic(base_url=server.url, api_key="sk_debug", max_retries=0)
    message = claude.messages.create(model="plain-model", max_tokens=9,
                                     messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text == "hello from plain"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 4
    assert fake.calls[-1]["max_completion_tokens"] == 9
    with claude.messages.stream(model="plain-model", max_tokens=9,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        final_message = stream.get_final_message()
    assert final_message.content[0].text == "t0 t1 t2 t3 "
    assert final_message.usage.input_tokens == 5 and final_message.usage.output_tokens == 4
    counted = claude.messages.count_tokens(model="plain-model",
                                           messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == 5
    # the first request of each API found the route missing (404): each ran once, as chat
    assert fake.paths == ["/v1/chat/completions"] * 6

    # the endpoint's errors come back in the client's API
    fake.fault = "429"
    with pytest.raises(anthropic.RateLimitError) as info:
        claude.messages.create(model="plain-model", max_tokens=9,
                               messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["type"] == "error"
    # ... and cool it down as any member's: the next request finds no one to serve it
    with pytest.raises(openai.APIStatusError) as cooling:
        client.responses.create(model="plain-model", input="Hi")
    assert cooling.value.status_code == 503
    assert cooling.value.body["code"] == "no_node_available"

    # the history counts them as the endpoint's (written once a second)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = server.runtime.history.query(node="plain", limit=100)
        if len(rows) >= 6:
            break
        time.sleep(0.2)
    assert {r["operation"] for r in rows} >= {"responses", "messages", "count_tokens"}
    assert {r["tokens_out"] for r in rows if r["status"] == 200} == {4, None}  # None: counts


def test_an_endpoint_that_speaks_messages_gets_the_request_as_sent(make_server,
                                                                  fakes) -> None:  # noqa: F811
    fake = fakes("native", "native-model", native=("messages",))
    server = make_server(**FAST)
    assert add(server, "native", fake.url).status_code == 201
    claude = anthropic.Anthropic(base_url=server.url, api_key="sk_debug", max_retries=0)
    body = dict(model="native-model", max_tokens=9, system="Be kind.",
                messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    message = claude.messages.create(**body)
    assert message.content[0].text == "hello from native" and message.id == "msg_x"
    assert fake.paths[-1] == "/v1/messages" and fake.calls[-1] == body
    with claude.messages.stream(**body) as stream:
        assert "".join(stream.text_stream) == "hello from native"
    assert fake.paths == ["/v1/messages", "/v1/messages"]


def test_an_answer_whose_storing_fails_still_reaches_its_client(make_server, fakes) -> None:  # noqa: F811
    """The database refuses the stored response (another writer holds SQLite's lock past the
    busy timeout): the answer, whole or streamed, still reaches the client, unstored."""
    import sqlite3
    import threading

    fake = fakes("plain", "plain-model", tokens=4)
    server = make_server(**FAST)
    assert add(server, "plain", fake.url).status_code == 201
    client = server.client()
    assert client.responses.create(model="plain-model", input="Hi").output_text  # routed
    results: dict[str, object] = {}

    def whole() -> None:
        results["whole"] = client.responses.create(model="plain-model", input="Hi")

    def streamed() -> None:
        with client.responses.stream(model="plain-model", input="Hi") as stream:
            results["streamed"] = stream.get_final_response()

    engine = server.runtime.db.engine
    engine.busy_timeout, engine._idle = 3.0, []  # writers give up in 3 s, not 30
    blocker = sqlite3.connect(engine.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # every writer waits, then gives up
    try:
        threads = [threading.Thread(target=t) for t in (whole, streamed)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert results["whole"].output_text == "hello from plain"
    assert results["streamed"].output_text == "t0 t1 t2 t3 "
    for answer in results.values():
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(answer.id)

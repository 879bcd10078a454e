"""Prefix-aware affinity (LB-2, issue 20): a conversation's follow-ups go back to the member
that served its earlier turns while that member stays within the load bound; a new
conversation goes to the least busy member; every worker of a balancer agrees. The members
are ``tests/fake_openai.py`` endpoints behind a real balancer, the client the openai SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import openai
import requests

from llmlb.balancer.registry import CACHE_SECONDS

from .conftest import CLOSED_ENDPOINT, free_port, llmlb_command
from .test_endpoints import ADMIN, FAST, add, nodes, wait_for


def ask(client: openai.OpenAI, messages: list[dict]) -> tuple[str, list[dict]]:
    """One turn: the member that answered, and the messages of the next turn."""
    raw = client.chat.completions.with_raw_response.create(model="fake-model",
                                                           messages=messages)
    answer = raw.parse().choices[0].message.content
    return raw.headers["X-LLMLB-Node"], [*messages, {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "Tell me more."}]


def conversation(n: int) -> list[dict]:
    return [{"role": "system", "content": f"You are assistant {n}; answer in one line."},
            {"role": "user", "content": f"Question {n}: what is the capital of country {n}?"}]


def loads_seen(server, **queued: int) -> None:
    """Wait until the balancer's view of the endpoints' own queues (their /metrics) is this."""
    assert wait_for(lambda: all(nodes(server)[name]["queued_requests"] == q
                                for name, q in queued.items())), nodes(server)


def test_new_conversations_go_to_the_idle_member_while_another_streams(make_server,
                                                                        fakes) -> None:
    # Load as the balancer counts it (no metrics): the requests it has in flight.
    a = fakes("a", metrics=False, tokens=400, token_delay=0.05)
    b = fakes("b", metrics=False, tokens=400, token_delay=0.05)
    server = make_server(**FAST)
    assert add(server, "a", a.url).status_code == 201
    assert add(server, "b", b.url).status_code == 201
    client = server.client()
    with client.chat.completions.with_streaming_response.create(
            model="fake-model", messages=conversation(0), stream=True) as streaming:
        busy = streaming.headers["X-LLMLB-Node"]
        chunks = streaming.parse()
        next(iter(chunks))  # it streams: one request in flight on `busy`
        # Quick questions, each a conversation of its own: nothing of them is cached
        # anywhere, so each goes to the member with nothing to do (a hash of their text
        # would have sent about half of them to the streaming one).
        served = [ask(client, conversation(n))[0] for n in range(1, 9)]
    idle = ({"a", "b"} - {busy}).pop()
    assert served == [idle] * 8, f"{busy} streams; new conversations went to {served}"


def test_a_follow_up_goes_where_its_prefix_is_warm_within_the_load_bound(make_server,
                                                                          fakes) -> None:
    a, b = fakes("a"), fakes("b")  # their load: what their /metrics say they run
    server = make_server(**FAST)
    assert add(server, "a", a.url).status_code == 201
    assert add(server, "b", b.url).status_code == 201
    client = server.client()

    a.running = 1
    loads_seen(server, a=1, b=0)
    turns = []
    for n in range(4):  # new conversations: the least busy member
        node, messages = ask(client, conversation(n))
        assert node == "b", f"conversation {n} started on {node}, the busier member"
        turns.append(messages)

    a.running = 0
    loads_seen(server, a=0, b=0)
    for n in range(4):  # follow-ups: back where their first turn is cached
        for _ in range(2):
            node, turns[n] = ask(client, turns[n])
            assert node == "b", f"a follow-up of conversation {n} left its member for {node}"

    a.running, b.running = 1, 1  # b with one more: 2 <= ceil(1.25 x 3 / 2), within the bound
    loads_seen(server, a=1, b=1)
    node, turns[0] = ask(client, turns[0])
    assert node == "b"

    a.running, b.running = 1, 4  # 5 > ceil(1.25 x 6 / 2) = 4: over the bound
    loads_seen(server, a=1, b=4)
    node, turns[1] = ask(client, turns[1])
    assert node == "a", "a follow-up went to a member over the load bound"

    a.running, b.running = 0, 1  # a sits idle: b must not take a second request
    loads_seen(server, a=0, b=1)
    node, turns[2] = ask(client, turns[2])
    assert node == "a", "a member sat idle while the warm one took a second request"

    b.running = 0  # conversation 1 now lives on a (its latest turns), 2 too
    loads_seen(server, a=0, b=0)
    assert [ask(client, turns[n])[0] for n in (0, 1, 2, 3)] == ["b", "a", "a", "b"]


def test_every_worker_of_a_balancer_knows_where_a_conversation_is_warm(start_process, fakes,
                                                                        tmp_path) -> None:
    a, b = fakes("a"), fakes("b")
    port = free_port()
    start_process([*llmlb_command(), "serve", "--role", "balancer", "--port", str(port),
                   "--workers", "2", "--dev"],
                  {"LLMLB_HOME": str(tmp_path / "balancer"), "HF_ENDPOINT": CLOSED_ENDPOINT,
                   "LLMLB_ENDPOINT_CHECK_SECONDS": "0.2"}, port)
    server = type("Balancer", (), {"url": f"http://127.0.0.1:{port}"})()
    assert add(server, "a", a.url).status_code == 201
    assert add(server, "b", b.url).status_code == 201

    def turn(messages: list[dict]) -> tuple[str, list[dict]]:
        # A new connection each time: any worker may take it.
        r = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                          json={"model": "fake-model", "messages": messages})
        assert r.status_code == 200, r.text
        return r.headers["X-LLMLB-Node"], [
            *messages, r.json()["choices"][0]["message"], {"role": "user", "content": "More."}]

    def every_worker_sees(**queued: int) -> None:
        # One worker answered with the new loads; the other's registry cache is at most
        # CACHE_SECONDS older (endpoint reports do not invalidate it), so it has them after.
        loads_seen(server, **queued)
        time.sleep(CACHE_SECONDS + 0.1)

    a.running = 1
    every_worker_sees(a=1, b=0)
    started = [turn(conversation(n)) for n in range(8)]
    assert {node for node, _ in started} == {"b"}
    a.running = 0  # equally busy now: only the record says where each conversation is warm
    every_worker_sees(a=0, b=0)
    for n, (_, messages) in enumerate(started):
        for _ in range(3):
            node, messages = turn(messages)
            assert node == "b", f"conversation {n} moved to {node} in another worker"


def test_two_processes_share_the_record(tmp_path) -> None:
    """What one process records, another sees at once (the balancer's workers are such
    processes), and a follow-up's prefix matches its earlier turn's."""
    from llmlb.balancer import routing
    from llmlb.balancer.prefixes import PrefixRecord

    first = routing.prefix_of("chat", "m", {"messages": conversation(1)})
    follow = routing.prefix_of("chat", "m", {"messages": [
        *conversation(1), {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its population?"}]})
    other = routing.prefix_of("chat", "m", {"messages": conversation(2)})
    path = tmp_path / "llmlb.db.prefixes"
    code = ("import sys; from llmlb.balancer.prefixes import PrefixRecord; from pathlib "
            "import Path; PrefixRecord(Path(sys.argv[1])).record([int(k) for k in "
            "sys.argv[3:]], int(sys.argv[2]))")
    done = subprocess.run([sys.executable, "-c", code, str(path), "7",
                           *map(str, first.kept)], env={**os.environ}, timeout=60)
    assert done.returncode == 0
    record = PrefixRecord(path)
    assert routing.warmth(follow, record.where(follow.keys)) == {7: first.depths[-1]}
    assert routing.warmth(other, record.where(other.keys)) == {}
    # And back: this process records, a fresh one reads.
    record.record(other.kept, 3)
    code = ("import sys; from llmlb.balancer.prefixes import PrefixRecord; from pathlib "
            "import Path; print(PrefixRecord(Path(sys.argv[1])).where([int(sys.argv[2])]))")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(other.kept[-1])],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[3]", done.stderr

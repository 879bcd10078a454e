"""External OpenAI-compatible servers as endpoints (LB-5): added through the API and the CLI,
their models listed, chat and streams relayed, calls not serialised, failover, overload
(429) handling, load from their own metrics, the queue bound, and the request history
(LB-6). The upstreams are ``tests/fake_openai.py`` servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from llmlb.auth import create_api_key

from .conftest import CLOSED_ENDPOINT, HELLO, free_port, llmlb_command

ADMIN = {"Authorization": "Bearer sk_debug"}
FAST = {"role": "balancer", "endpoint_check_seconds": 0.2, "cooldown_seconds": 0.5,
        "cooldown_max_seconds": 10}


def add(server, name: str, url: str, **extra) -> requests.Response:
    return requests.post(f"{server.url}/v0/endpoints", headers=ADMIN, timeout=30,
                         json={"name": name, "base_url": url, **extra})


def nodes(server) -> dict[str, dict]:
    # Standalone, the first listing asks the engines whether they can run (imports torch).
    r = requests.get(f"{server.url}/v0/nodes", headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    return {n["name"]: n for n in r.json()["data"]}


def wait_for(what, timeout: float = 10.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_an_endpoint_serves_its_models_through_llmlb(make_server, fakes) -> None:
    fake = fakes("gpu", "fake-model", "Llama3.2:1b")
    server = make_server(**FAST)
    r = add(server, "big-box", fake.url)
    assert r.status_code == 201, r.text
    assert r.json()["models"] == ["Llama3.2:1b", "fake-model"]

    listed = nodes(server)["big-box"]
    assert listed["kind"] == "endpoint" and listed["status"] == "online"
    assert listed["url"] == fake.url and listed["has_api_key"] is False
    client = server.client()
    models = {m.id: m for m in client.models.list().data}
    assert models["fake-model"].model_extra["nodes"] == ["big-box"]

    raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=HELLO)
    assert raw.headers["X-LLMLB-Node"] == "big-box"
    assert raw.parse().choices[0].message.content == "hello from gpu"
    # Ollama-style ids (a colon) reach the endpoint as the client wrote them.
    answer = client.completions.create(model="Llama3.2:1b", prompt="hi")
    assert answer.choices[0].text == "hello from gpu"
    assert fake.calls[-1]["model"] == "Llama3.2:1b"
    assert client.models.retrieve("Llama3.2:1b").model_extra["nodes"] == ["big-box"]

    stream = client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "t0 t1 t2 t3 t4 "
    # llmlb asked for usage (for its metrics) but the client, who did not, gets no usage event.
    assert fake.calls[-1]["stream_options"] == {"include_usage": True}
    assert all(c.usage is None and c.choices for c in chunks)
    asked = list(client.chat.completions.create(model="fake-model", messages=HELLO,
                                                stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].usage.completion_tokens == 5 and asked[-1].choices == []
    # A server that refuses stream_options gets the client's request as the client sent it.
    fake.fault = "no-stream-options"
    chunks = list(client.chat.completions.create(model="fake-model", messages=HELLO,
                                                 stream=True))
    assert len(chunks) == 5 and "stream_options" not in fake.calls[-1]
    fake.fault = None

    r = requests.delete(f"{server.url}/v0/endpoints/big-box", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    assert "big-box" not in nodes(server)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="fake-model", messages=HELLO)


def test_an_api_key_is_stored_sealed_and_never_shown(make_server, fakes, monkeypatch) -> None:
    fake = fakes("hosted", api_key="sk-upstream-secret-123")
    server = make_server(**FAST)
    r = add(server, "hosted", fake.url)
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_url"
    assert "API key" in r.json()["error"]["message"]

    r = add(server, "hosted", fake.url, api_key="sk-upstream-secret-123")
    assert r.status_code == 201, r.text
    assert r.json()["has_api_key"] is True and "sk-upstream" not in r.text
    assert "sk-upstream" not in requests.get(f"{server.url}/v0/nodes", headers=ADMIN,
                                             timeout=10).text
    stored = server.runtime.db.engine.execute(
        "SELECT credential FROM nodes WHERE name='hosted'").fetchone()[0]
    assert stored.startswith("fernet:") and "sk-upstream" not in stored
    key_file = server.runtime.settings.home / "endpoints.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    answer = server.client().chat.completions.create(model="fake-model", messages=HELLO)
    assert answer.choices[0].message.content == "hello from hosted"

    # By environment variable name: only the name is stored.
    monkeypatch.setenv("LLMLB_ENDPOINT_KEY_HOSTED", "sk-upstream-secret-123")
    r = add(server, "hosted-env", fake.url, api_key_env="LLMLB_ENDPOINT_KEY_HOSTED")
    assert r.status_code == 201, r.text
    assert r.json()["api_key_env"] == "LLMLB_ENDPOINT_KEY_HOSTED"
    stored = server.runtime.db.engine.execute(
        "SELECT credential FROM nodes WHERE name='hosted-env'").fetchone()[0]
    assert stored == "env:LLMLB_ENDPOINT_KEY_HOSTED"


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"name": "x"}, "base_url", "Missing required parameter"),
    ({"name": "x", "base_url": "file:///etc/passwd"}, "base_url", "http:// or https://"),
    ({"name": "x", "base_url": "ftp://example/v1"}, "base_url", "http:// or https://"),
    ({"name": "x", "base_url": CLOSED_ENDPOINT + "/v1"}, "base_url", "cannot be reached"),
    ({"name": "x", "base_url": 5}, "base_url", "a string"),
    ({"base_url": "http://127.0.0.1:9/v1"}, "name", "Missing required parameter"),
    ({"name": "../x", "base_url": "http://127.0.0.1:9/v1"}, "name", "Invalid value"),
    ({"name": "x", "base_url": "http://u:p@127.0.0.1:9/v1"}, "base_url", "no credentials"),
    ({"name": "x", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "NOT SET"},
     "api_key_env", "environment variable"),
    ({"name": "x", "base_url": "http://127.0.0.1:99999/v1"}, "base_url", "usable URL"),
    ({"name": "x", "base_url": "http://127.0.0.1:0/v1"}, "base_url", "port"),
    ({"name": "x", "base_url": "http://[::1/v1"}, "base_url", "usable URL"),
    ({"name": "x", "base_url": "http://127.0.0.1:9/v1\r\nX-Injected: 1"}, "base_url",
     "control characters"),
    ({"name": "x", "base_url": "http://127.0.0.1:9/v1\n"}, "base_url", "control characters"),
    ({"name": "x", "base_url": "http://127.0.0.1:9/v1?key=1"}, "base_url", "no query"),
])
def test_bad_endpoint_input_is_a_400(server, body, param, fragment) -> None:
    r = requests.post(f"{server.url}/v0/endpoints", headers=ADMIN, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_a_server_that_is_not_openai_and_a_taken_name_are_refused(server, fakes) -> None:
    fake = fakes("gpu")
    r = add(server, "web", fake.url.removesuffix("/v1") + "/nowhere")  # a 404, no model list
    assert r.status_code == 400 and r.json()["error"]["code"] == "endpoint_unusable", r.text
    assert add(server, "local", fake.url).status_code == 409  # the in-process node's name
    assert add(server, "gpu", fake.url).status_code == 201
    r = add(server, "gpu", fake.url)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    r = requests.post(f"{server.url}/v0/nodes", headers=ADMIN, timeout=10,  # a node, same name
                      json={"name": "gpu", "url": "http://127.0.0.1:9", "secret": "s" * 32})
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    assert nodes(server)["gpu"]["kind"] == "endpoint"
    r = requests.delete(f"{server.url}/v0/endpoints/nope", headers=ADMIN, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_found"
    r = requests.post(f"{server.url}/v0/endpoints", json={"name": "a", "base_url": fake.url},
                      headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401


def test_calls_to_an_endpoint_are_not_serialised(make_server, fakes) -> None:
    fake = fakes("gpu", latency=0.3)
    server = make_server(**FAST)
    assert add(server, "gpu", fake.url).status_code == 201
    client = server.client()

    def ask(_: int) -> str:
        return client.chat.completions.create(model="fake-model", messages=HELLO) \
            .choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    elapsed = time.perf_counter() - start
    assert answers == ["hello from gpu"] * 16
    assert fake.max_concurrent >= 8, fake.max_concurrent
    # Serialised they take 4.8 s; side by side about 0.3 s (room left for a busy machine).
    assert elapsed < 3.0, f"16 calls of 0.3 s took {elapsed:.2f} s: serialised?"


def test_failover_health_and_recovery_between_two_endpoints(make_server, fakes) -> None:
    a, b = fakes("a"), fakes("b")
    server = make_server(**FAST, proxy_read_timeout_seconds=1.0, affinity=False)
    assert add(server, "a", a.url).status_code == 201
    assert add(server, "b", b.url).status_code == 201
    b.waiting = 1  # by its metrics, busier: the failing one is always tried first
    assert wait_for(lambda: nodes(server)["b"]["queued_requests"] == 1)
    client = server.client()
    for fault in ("500", "cut", "hang"):
        a.fault = fault
        for _ in range(4):
            answer = client.chat.completions.create(model="fake-model", messages=HELLO)
            assert answer.choices[0].message.content == "hello from b", fault
        assert nodes(server)["a"]["failures"] >= 1, (fault, nodes(server)["a"], len(a.calls))
        a.fault = None
        assert wait_for(lambda: nodes(server)["a"]["status"] == "online")

    a.fault = "down"  # its /v1/models fails too: the check makes it offline
    listed = wait_for(lambda: (n := nodes(server))["a"]["status"] == "offline" and n)
    assert listed and "500" in listed["a"]["last_check_error"]
    answers = {client.chat.completions.create(model="fake-model", messages=HELLO)
               .choices[0].message.content for _ in range(6)}
    assert answers == {"hello from b"}
    a.fault = None
    assert wait_for(lambda: nodes(server)["a"]["status"] == "online")
    stream = client.chat.completions.create(model="fake-model", messages=HELLO, stream=True)
    assert len([c for c in stream if c.choices]) == 5


def test_an_upstream_429_never_reaches_the_client_while_another_can_serve(make_server,
                                                                           fakes) -> None:
    busy, free = fakes("busy"), fakes("free")
    server = make_server(**FAST, affinity=False)
    assert add(server, "busy", busy.url).status_code == 201
    assert add(server, "free", free.url).status_code == 201
    free.waiting = 1  # by its metrics, busier: the 429 one is always tried first
    assert wait_for(lambda: nodes(server)["free"]["queued_requests"] == 1)
    busy.fault = "429"
    client = server.client()
    for _ in range(6):
        assert client.chat.completions.create(model="fake-model", messages=HELLO) \
            .choices[0].message.content == "hello from free"
    listed = nodes(server)["busy"]
    assert busy.calls, "never tried"
    assert listed["status"] == "cooldown" and "429" in listed["last_error"], listed
    # Its Retry-After (7 s) sets the cooldown, not the base cooldown of 0.5 s.
    assert listed["cooldown_until"] - time.time() > 4

    # Alone, its 429 is the answer, Retry-After included.
    requests.delete(f"{server.url}/v0/endpoints/free", headers=ADMIN, timeout=10)
    requests.delete(f"{server.url}/v0/endpoints/busy", headers=ADMIN, timeout=10)
    assert add(server, "busy", busy.url).status_code == 201
    r = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                      json={"model": "fake-model", "messages": HELLO})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7", r.text


def test_load_comes_from_the_endpoints_own_metrics(make_server, fakes) -> None:
    queued, idle, plain = fakes("queued"), fakes("idle"), fakes("plain", metrics=False)
    queued.waiting, queued.running = 7, 3
    server = make_server(**FAST, affinity=False)
    for fake in (queued, idle, plain):
        assert add(server, fake.name, fake.url).status_code == 201
    listed = wait_for(lambda: (n := nodes(server))["queued"]["load_source"] == "metrics"
                      and n["idle"]["load_source"] == "metrics" and n)
    assert listed["queued"]["queued_requests"] == 10
    assert listed["queued"]["endpoint_waiting"] == 7
    assert listed["idle"]["load_source"] == "metrics" and listed["idle"]["queued_requests"] == 0
    assert listed["plain"]["load_source"] == "balancer"
    client = server.client()
    answered = {client.chat.completions.create(model="fake-model", messages=HELLO)
                .choices[0].message.content for _ in range(12)}
    assert answered == {"hello from idle", "hello from plain"}


def test_the_queue_in_front_of_an_endpoint_is_bounded(make_server, fakes) -> None:
    fake = fakes("slow", latency=2.0)  # all six arrive while the first three are held
    server = make_server(**FAST, endpoint_max_requests=3)
    assert add(server, "slow", fake.url).status_code == 201

    def ask(_: int) -> requests.Response:
        return requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                             json={"model": "fake-model", "messages": HELLO})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 429, 429, 429], codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "endpoint_queue_full"


def test_every_request_leaves_a_history_row(make_server, fakes) -> None:
    fake = fakes("gpu", tokens=4)
    server = make_server(**FAST)
    assert add(server, "gpu", fake.url).status_code == 201
    client = server.client()
    client.chat.completions.create(model="fake-model", messages=HELLO)
    list(client.chat.completions.create(model="fake-model", messages=HELLO, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)

    def rows(**params) -> list[dict]:
        r = requests.get(f"{server.url}/v0/requests", headers=ADMIN, params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    # A client that leaves a stream half-way: 499, as nginx would log it.
    fake.token_delay = 0.3
    with requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, stream=True,
                       timeout=10, json={"model": "fake-model", "messages": HELLO,
                                         "stream": True}) as r:
        next(r.iter_lines())
    assert wait_for(lambda: len(rows()) == 4)
    assert rows()[0]["status"] == 499 and rows()[0]["error"] == "client_left"
    missing, streamed, plain = rows()[1:]
    assert (missing["status"], missing["model"], missing["node"]) == (404, "no-such-model", None)
    for row in (streamed, plain):
        assert row["node"] == "gpu" and row["model"] == "fake-model" and row["status"] == 200
        assert row["key_name"] == "sk_debug"
        assert (row["tokens_in"], row["tokens_out"]) == (5, 4)
        assert row["latency_ms"] >= row["ttft_ms"] > 0
    assert streamed["stream"] is True and plain["stream"] is False
    assert [r["status"] for r in rows(status="4xx")] == [499, 404]
    assert len(rows(node="gpu")) == 3 and len(rows(model="fake-model", limit=1)) == 1
    r = requests.get(f"{server.url}/v0/requests", headers=ADMIN, params={"status": "abc"},
                     timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"


def test_the_cli_adds_lists_and_removes_endpoints(llmlb_home, fakes, make_server,
                                                  monkeypatch) -> None:
    fake = fakes("gpu", api_key="sk-cli-secret")
    env = {**os.environ, "LLMLB_HOME": str(llmlb_home)}

    def llmlb(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*llmlb_command(), "endpoints", *args], env={**env, **extra},
                              timeout=60, capture_output=True, text=True)

    # The CLI is not the balancer: it says where the key will be read and claims nothing
    # for what only the balancer can check (its own environment).
    done = llmlb("add", "big-box", fake.url, "--api-key-env", "LLMLB_ENDPOINT_KEY_VLLM",
                 LLMLB_ENDPOINT_KEY_VLLM="sk-cli-secret")
    assert done.returncode == 0, done.stderr
    assert "fake-model" in done.stdout and "online" not in done.stdout
    assert "reads LLMLB_ENDPOINT_KEY_VLLM from its OWN environment" in done.stdout
    # Without the variable in this shell, the server is still checked (it asks for a key).
    done = llmlb("add", "no-key-here", fake.url, "--api-key-env", "LLMLB_ENDPOINT_KEY_OTHER")
    assert done.returncode == 0, done.stderr
    assert "not checked: this shell has no LLMLB_ENDPOINT_KEY_OTHER" in done.stdout
    bad = llmlb("add", "other", fake.url, "--api-key-env", "VLLM_KEY")
    assert bad.returncode != 0 and "LLMLB_ENDPOINT_KEY_" in bad.stderr
    bad = llmlb("add", "other", "file:///etc/passwd")
    assert bad.returncode != 0 and "http:// or https://" in bad.stderr
    unreachable = llmlb("add", "other", f"http://127.0.0.1:{free_port()}/v1")
    assert unreachable.returncode != 0 and "cannot be reached" in unreachable.stderr
    listed = llmlb("list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert header == ["NAME", "BASE_URL", "STATUS", "KEY", "MODELS", "LAST_CHECK_ERROR"]
    big = next(r for r in rows if r[0] == "big-box")
    assert big[2:4] == ["offline", "env:LLMLB_ENDPOINT_KEY_VLLM"]
    assert "not checked by the balancer yet" in big[5]
    assert "sk-cli-secret" not in listed.stdout

    # The balancer, with the variable in its environment, checks it and routes to it.
    monkeypatch.setenv("LLMLB_ENDPOINT_KEY_VLLM", "sk-cli-secret")
    server = make_server(**FAST)
    assert wait_for(lambda: nodes(server)["big-box"]["status"] == "online")
    assert server.client().chat.completions.create(
        model="fake-model", messages=HELLO).choices[0].message.content == "hello from gpu"
    other = wait_for(lambda: (n := nodes(server)["no-key-here"])["last_check_error"]
                     and "not checked" not in n["last_check_error"] and n)
    assert other["status"] == "offline" and "LLMLB_ENDPOINT_KEY_OTHER is not set" in \
        other["last_check_error"]

    assert llmlb("remove", "big-box").returncode == 0
    assert "big-box" not in llmlb("list").stdout
    assert llmlb("remove", "big-box").returncode != 0


def test_history_older_than_its_retention_is_forgotten(make_server) -> None:
    server = make_server(role="balancer", history_retention_days=1)
    db = server.runtime.db
    now = time.time()
    with db.engine.transaction() as conn:
        for age_days in (3, 0.5):
            conn.execute("INSERT INTO requests(at, operation, status, latency_ms) "
                         "VALUES (?, 'chat', 200, 1)", (now - age_days * 86400,))
    server.runtime.cluster_supervisor.wake("history-prune")  # the supervisor's task, run now

    def ages() -> list[float]:
        r = requests.get(f"{server.url}/v0/requests", headers=ADMIN, timeout=10)
        return [round((now - row["at"]) / 86400, 1) for row in r.json()["data"]]

    assert wait_for(lambda: ages() == [0.5]), ages()


def test_an_endpoint_reads_only_the_environment_variables_made_for_it(make_server, fakes,
                                                                       monkeypatch) -> None:
    """Finding 3: an admin adding an endpoint must not be able to ship any variable of the
    balancer's environment (a Hugging Face token, cloud credentials) to any URL."""
    fake = fakes("catcher")
    monkeypatch.setenv("HF_TOKEN", "hf_balancer_private_token")
    monkeypatch.setenv("TEAM_VLLM_TOKEN", "sk-team-token")
    server = make_server(**FAST, endpoint_env_allowlist=("TEAM_VLLM_TOKEN",))
    for name in ("HF_TOKEN", "LLMLB_ADMIN_PASSWORD", "LLMLB_ENDPOINT_KEY_", "PATH"):
        r = add(server, "catcher", fake.url, api_key_env=name)
        assert r.status_code == 400, (name, r.text)
        error = r.json()["error"]
        assert error["param"] == "api_key_env" and "LLMLB_ENDPOINT_KEY_" in error["message"]
    assert fake.requests == []  # refused before anything was asked of the URL
    # Named for it, or listed by the operator: accepted.
    monkeypatch.setenv("LLMLB_ENDPOINT_KEY_CATCHER", "sk-made-for-it")
    assert add(server, "ok", fake.url, api_key_env="LLMLB_ENDPOINT_KEY_CATCHER"
               ).status_code == 201
    assert add(server, "team", fake.url, api_key_env="TEAM_VLLM_TOKEN").status_code == 201
    assert {auth for _, _, auth in fake.requests} == {"Bearer sk-made-for-it",
                                                      "Bearer sk-team-token"}

    # An endpoint stored with such a name before (an older llmlb): it sends nothing and goes
    # offline, saying why.
    with server.runtime.db.engine.transaction() as conn:
        conn.execute("INSERT INTO nodes(name, kind, url, credential, report, registered_at, "
                     "last_seen) VALUES ('old', 'endpoint', ?, 'env:HF_TOKEN', ?, ?, ?)",
                     (fake.url, json.dumps({"healthy": True, "models": [
                         {"id": "old-model", "object": "model"}]}), time.time(), time.time()))
    old = wait_for(lambda: (n := nodes(server)["old"])["status"] == "offline" and n)
    assert old and "HF_TOKEN is neither" in old["last_check_error"], old
    listed = {e["name"]: e for e in requests.get(f"{server.url}/v0/endpoints", headers=ADMIN,
                                                 timeout=10).json()["data"]}
    assert listed["old"]["status"] == "offline" and listed["ok"]["status"] == "online"
    assert "HF_TOKEN is neither" in listed["old"]["last_check_error"]
    r = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                      json={"model": "old-model", "messages": HELLO})
    assert r.status_code == 503, r.text
    assert not any("hf_balancer" in (auth or "") for _, _, auth in fake.requests)


def test_an_upstreams_headers_never_speak_for_llmlb(make_server, fakes) -> None:
    """Finding 5: of an endpoint's headers only those of the answer pass; llmlb's security
    headers are on every answer; an HTML error page becomes llmlb's JSON error."""
    fake = fakes("hostile")
    fake.extra_headers = {
        "Content-Security-Policy": "default-src *", "X-Frame-Options": "ALLOWALL",
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
        "Set-Cookie": "session=stolen; Path=/", "Location": "https://evil.example/",
        "Referrer-Policy": "unsafe-url", "X-Request-Id": "req-123",
        "openai-processing-ms": "42", "x-ratelimit-remaining-requests": "99"}
    server = make_server(**FAST)
    assert add(server, "hostile", fake.url).status_code == 201
    r = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                      json={"model": "fake-model", "messages": HELLO})
    streamed = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                             json={"model": "fake-model", "messages": HELLO, "stream": True})
    for answer in (r, streamed):
        assert answer.status_code == 200, answer.text
        h = answer.headers
        assert h["Content-Security-Policy"].startswith("default-src 'self'")
        assert h["X-Frame-Options"] == "DENY" and h["Referrer-Policy"] == "same-origin"
        for gone in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                     "Set-Cookie", "Location"):
            assert gone not in h, (gone, dict(h))
        assert h["X-Request-Id"] == "req-123" and h["openai-processing-ms"] == "42"
        assert h["x-ratelimit-remaining-requests"] == "99"
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    assert b"data: [DONE]" in streamed.content

    fake.fault = "html"
    with pytest.raises(openai.APIStatusError) as failed:
        server.client().chat.completions.create(model="fake-model", messages=HELLO)
    answer = failed.value.response
    assert answer.status_code == 502 and answer.headers["Content-Type"] == "application/json"
    assert b"<html" not in answer.content and b"<script" not in answer.content
    error = failed.value.body
    assert error["code"] == "upstream_error" and "'hostile'" in error["message"]
    assert "HTTP 404" in error["message"] and "text/html" in error["message"]
    assert answer.headers["X-Frame-Options"] == "DENY"


def test_an_endpoint_is_never_this_llmlb_and_its_name_is_checked_first(make_server,
                                                                        fakes) -> None:
    """Finding 6 and the first hour: a loop is refused whatever key it is given; a taken
    name is the answer before anything is asked of the URL."""
    server = make_server(**FAST)
    for url in (server.url + "/v1", server.url, server.url.replace("127.0.0.1", "localhost")):
        r = add(server, "myself", url, api_key="sk_debug")
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "endpoint_loop", r.text
        assert r.json()["error"]["param"] == "base_url"
    assert "myself" not in nodes(server)

    node_key, _ = create_api_key(server.runtime.db, "nodes", "node")
    r = requests.post(f"{server.url}/v0/nodes", headers={"Authorization": f"Bearer {node_key}"},
                      timeout=10, json={"name": "gpu-node", "url": "http://127.0.0.1:9",
                                        "secret": "s" * 32, "report": {}})
    assert r.status_code == 201, r.text
    keyed = fakes("keyed", api_key="sk-needed")
    r = add(server, "gpu-node", keyed.url)  # no key given: probing would say 401
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken", r.text
    assert keyed.requests == []


@pytest.mark.parametrize(("prefix", "base"), [
    ("/v1beta/openai", "{root}/v1beta/openai"),  # Google's OpenAI-compatible base
    ("/api/v1", "{root}/api/v1/"),
    ("/v1", "{root}"),  # no path: /v1, where every OpenAI server answers
])
def test_the_paths_asked_are_the_openai_sdks(make_server, fakes, prefix, base) -> None:
    """``{base_url}/models``, ``{base_url}/chat/completions``: what the openai SDK asks."""
    fake = fakes("gemini-like", prefix=prefix)
    root = fake.url.removesuffix(prefix)
    server = make_server(**FAST)
    r = add(server, "g", base.format(root=root))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "online" and r.json()["models"] == ["fake-model"]
    assert ("GET", f"{prefix}/models") in [(m, p) for m, p, _ in fake.requests]
    answer = server.client().chat.completions.create(model="fake-model", messages=HELLO)
    assert answer.choices[0].message.content == "hello from gemini-like"
    assert [p for m, p, _ in fake.requests if m == "POST"] == [f"{prefix}/chat/completions"]
    listed = requests.get(f"{server.url}/v0/endpoints", headers=ADMIN, timeout=10).json()
    assert listed["data"][0]["status"] == "online"
    assert listed["data"][0]["last_check_error"] is None

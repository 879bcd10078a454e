"""Load balancing across real processes on loopback (LB-1..LB-4): `llmlb serve --role
balancer` and `llmlb node` processes with the tiny models, talked to with the openai SDK."""

from __future__ import annotations

import collections
import http.client
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import requests

from llmlb.auth import create_api_key
from llmlb.state import open_database

from .conftest import CLOSED_ENDPOINT, HELLO, Proc, free_port, llmlb_command
from .test_plugins import SLOW_ENGINE, write_plugin

# Time is configuration: short here, so that offline, cooldown and heartbeats show quickly.
FAST = {"LLMLB_HEARTBEAT_SECONDS": "0.5", "LLMLB_NODE_TIMEOUT_SECONDS": "3",
        "LLMLB_COOLDOWN_SECONDS": "0.5", "LLMLB_COOLDOWN_MAX_SECONDS": "2"}


@dataclass
class Cluster:
    balancer: Proc
    home: Path
    admin: str
    api: str
    node_key: str
    plugins: Path
    start_node: Callable[..., Proc]
    nodes: dict[str, Proc] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.balancer.url

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api, max_retries=0,
                             timeout=kwargs.pop("timeout", 120), **kwargs)

    def nodes_json(self) -> dict[str, dict]:
        r = requests.get(f"{self.url}/v0/nodes", headers=bearer(self.admin), timeout=10)
        assert r.status_code == 200, r.text
        return {n["name"]: n for n in r.json()["data"]}

    def wait(self, what: Callable[[dict[str, dict]], bool], timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes_json()
            if what(nodes):
                return nodes
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{p.log()[-3000:]}" for n, p in self.nodes.items())
                raise AssertionError(f"cluster never got there: {nodes}\n{logs}")
            time.sleep(0.1)

    def wait_online(self, *names: str, timeout: float = 60) -> dict:
        return self.wait(lambda ns: all(ns.get(n, {}).get("status") == "online"
                                        for n in names), timeout)

    def node_secret(self, name: str) -> str:
        """What a node accepts from its balancer: the secret it made, kept in its home."""
        db = open_database(self.home.parent / name / "llmlb.db")
        try:
            return db.get_meta("node_secret")
        finally:
            db.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def install_model(models_dir: Path, model_id: str, source: Path | str) -> None:
    """A tiny model (a file or a directory), or a slow one: ``"slow:<seconds per token>"``."""
    target = models_dir / model_id
    if isinstance(source, str):
        target.mkdir(parents=True)
        (target / "model.slow").write_text(source.removeprefix("slow:"))
    elif source.is_file():
        target.mkdir(parents=True)
        shutil.copy(source, target / source.name)
    else:
        shutil.copytree(source, target)


@pytest.fixture
def cluster(start_process, llmlb_home: Path, tmp_path: Path, tiny) -> Iterator[Callable]:
    """Start a balancer; ``.start_node(name, {model_id: tiny key | "slow:0.1"}, **env)``
    starts nodes registering with it."""
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_ENGINE)

    def start(balancer_models: dict[str, str] | None = None, **env: str) -> Cluster:
        home = tmp_path / "balancer"
        db = open_database(home / "llmlb.db")
        admin, _ = create_api_key(db, "admin", "admin")
        api, _ = create_api_key(db, "client", "api")
        node_key, _ = create_api_key(db, "nodes", "node")
        db.close()
        for model_id, key in (balancer_models or {}).items():
            install_model(home / "models", model_id, tiny[key])
        port = free_port()
        balancer = start_process(
            [*llmlb_command(), "serve", "--role", "balancer", "--port", str(port)],
            {"LLMLB_HOME": str(home), "HF_ENDPOINT": CLOSED_ENDPOINT,
             "LLMLB_ADMIN_PASSWORD": "correct horse", "LLMLB_PLUGINS_DIR": str(plugins),
             **FAST, **env}, port)
        made = Cluster(balancer, home, admin, api, node_key, plugins, lambda *a, **k: None)

        def start_node(name: str, models: dict[str, str] | None = None, *, wait: bool = True,
                       key: str | None = None, node_dir: str | None = None,
                       **node_env: str) -> Proc:
            """``node_dir``: the node's home under tmp_path (default: its name), and its
            key in ``nodes``."""
            node_home = tmp_path / (node_dir or name)
            for model_id, source in (models or {}).items():
                install_model(node_home / "models", model_id,
                              source if source.startswith("slow:") else tiny[source])
            node_port = free_port()
            proc = start_process(
                [*llmlb_command(), "node", "--balancer-url", balancer.url, "--name", name,
                 "--port", str(node_port), "--host", "127.0.0.1"],
                {"LLMLB_HOME": str(node_home), "HF_ENDPOINT": CLOSED_ENDPOINT,
                 "LLMLB_NODE_API_KEY": key or node_key, "LLMLB_PLUGINS_DIR": str(plugins),
                 **FAST, **env, **node_env}, node_port)
            made.nodes[node_dir or name] = proc
            if wait:  # online, its engines checked (it registers before: they import torch)
                made.wait(lambda ns: ns.get(name, {}).get("status") == "online"
                          and bool(ns[name]["engines"]))
            return proc

        made.start_node = start_node
        return made

    yield start


def test_nodes_register_with_hardware_and_keep_their_identity(cluster) -> None:
    c = cluster()
    c.start_node("gpu-a", {"tiny-gguf": "llama-gguf"})
    c.start_node("gpu-b", {"tiny-st": "llama-st"})
    # A node registers before its engines' first checks; their rows follow at once.
    nodes = c.wait(lambda ns: ns.get("gpu-b", {}).get("models") == ["tiny-st"]
                   and ns["gpu-a"]["formats"] and ns["gpu-b"]["formats"])
    a = nodes["gpu-a"]
    assert a["kind"] == "node" and a["status"] == "online" and a["models"] == ["tiny-gguf"]
    assert a["url"] == c.nodes["gpu-a"].url
    hw = a["hardware"]
    assert hw["cpu_count"] >= 1 and hw["memory_total_bytes"] > hw["memory_free_bytes"] > 0
    assert hw["gpu_count"] == len(hw["gpus"])  # NVML's view; none on a machine without GPU
    assert {"gguf", "safetensors", "onnx"} <= set(a["formats"])
    assert a["seconds_since_heartbeat"] < 3 and a["active_requests"] == 0
    # The SDK sees every node's models.
    listed = {m.id: m for m in c.client().models.list().data}
    assert set(listed) == {"tiny-gguf", "tiny-st"}
    assert listed["tiny-st"].model_extra["nodes"] == ["gpu-b"]

    first_id = a["id"]
    c.nodes["gpu-a"].stop()
    c.start_node("gpu-a", {})  # same name, new port, models already on its disk
    again = c.wait(lambda ns: ns["gpu-a"]["url"] != a["url"])["gpu-a"]
    assert again["id"] == first_id and again["models"] == ["tiny-gguf"]
    assert len(c.nodes_json()) == 2


def test_each_model_goes_to_the_node_that_has_it(cluster) -> None:
    c = cluster()
    c.start_node("node-a", {"tiny-gguf": "llama-gguf"})
    c.start_node("node-b", {"tiny-st": "llama-st"})
    client = c.client()
    for model, node in (("tiny-gguf", "node-a"), ("tiny-st", "node-b")) * 2:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO,
                                                               max_tokens=3)
        assert raw.headers["X-LLMLB-Node"] == node
        assert raw.parse().usage.completion_tokens == 3
        with client.chat.completions.with_streaming_response.create(
                model=model, messages=HELLO, max_tokens=3, stream=True,
                stream_options={"include_usage": True}) as stream:
            assert stream.headers["X-LLMLB-Node"] == node
            chunks = list(stream.parse())
        assert chunks[-1].usage.completion_tokens == 3
    text = client.completions.create(model="tiny-gguf", prompt="Once", max_tokens=2)
    assert text.usage.completion_tokens == 2
    # Errors keep their status and code through the balancer.
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="tiny-gguf", input="hi")
    assert bad.value.body["code"] == "unsupported_operation"
    assert bad.value.response.headers["X-LLMLB-Node"] == "node-a"


def concurrently(c: Cluster, model: str, contents: list[str], max_tokens: int = 10,
                 ) -> collections.Counter:
    """Send one chat per content at once; which node answered how many (all must succeed)."""
    served: collections.Counter = collections.Counter()
    failures: list[Exception] = []

    def ask(content: str) -> None:
        try:
            raw = c.client().chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens)
            served[raw.headers["X-LLMLB-Node"]] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=ask, args=(text,)) for text in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return served


def test_two_nodes_with_one_model_share_concurrent_load(cluster) -> None:
    c = cluster(LLMLB_AFFINITY="0")  # least busy alone decides
    c.start_node("node-a", {"snail": "slow:0.05"})
    c.start_node("node-b", {"snail": "slow:0.05"})
    served = concurrently(c, "snail", [f"question {i}" for i in range(8)])
    # Each node generates one answer at a time: in-flight counts send the next to the other.
    assert set(served) == {"node-a", "node-b"} and min(served.values()) >= 3, served


def test_killed_node_goes_offline_and_no_request_fails(cluster) -> None:
    c = cluster()
    c.start_node("node-a", {"tiny-gguf": "llama-gguf"})
    c.start_node("node-b", {"tiny-gguf": "llama-gguf"})
    client = c.client()
    before = collections.Counter(
        client.chat.completions.with_raw_response.create(
            model="tiny-gguf", messages=[{"role": "user", "content": f"hi {i}"}],
            max_tokens=2).headers["X-LLMLB-Node"] for i in range(10))
    assert set(before) == {"node-a", "node-b"}

    c.nodes["node-a"].stop(signal.SIGKILL)
    killed_at = time.monotonic()
    after: collections.Counter = collections.Counter()
    n = 0
    # Through cooldowns ending and the node going offline, and at least a dozen requests
    # however slow the machine.
    while time.monotonic() - killed_at < 5 or n <= 10:
        n += 1  # new conversations: affinity would send a repeated one to a single node
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-gguf", messages=[{"role": "user", "content": f"after {n}"}],
            max_tokens=2)  # any failure raises here
        after[raw.headers["X-LLMLB-Node"]] += 1
    assert set(after) == {"node-b"} and n > 10
    assert "Node node-a failed (node node-a: " in c.balancer.log()
    nodes = c.wait(lambda ns: ns["node-a"]["status"] == "offline", timeout=10)
    assert nodes["node-b"]["status"] == "online"
    assert "Node node-a is offline" in c.balancer.log()


def test_stream_of_a_dying_node_ends_with_an_error_event_and_done(cluster) -> None:
    c = cluster()
    c.start_node("node-a", {"snail": "slow:0.1"})
    r = requests.post(f"{c.url}/v1/chat/completions", headers=bearer(c.api), stream=True,
                      json={"model": "snail", "messages": HELLO, "max_tokens": 100,
                            "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["X-LLMLB-Node"] == "node-a"
    events = []
    for line in r.iter_lines():
        if line.startswith(b"data: "):
            events.append(line[6:])
            if len(events) == 4:
                c.nodes["node-a"].stop(signal.SIGKILL)
    assert len(events) < 60  # it did not run to its end
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "node_failed" and "node-a" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])


def test_chunks_pass_through_one_by_one_and_a_client_leaving_frees_the_node(cluster) -> None:
    c = cluster()
    node = c.start_node("node-a", {"snail": "slow:0.1"})
    with requests.post(f"{c.url}/v1/chat/completions", headers=bearer(c.api), stream=True,
                       json={"model": "snail", "messages": HELLO, "max_tokens": 12,
                             "stream": True}, timeout=60) as r:
        arrivals = [time.monotonic() for line in r.iter_lines()
                    if line.startswith(b'data: {"id"') and b'"content":"' in line
                    and b'"content":""' not in line]
    assert len(arrivals) == 12
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    # One token per 100 ms at the node: buffering anywhere would bunch them together.
    assert gaps[len(gaps) // 2] > 0.05, gaps
    assert arrivals[-1] - arrivals[0] > 0.6

    # A client that leaves after 3 chunks: the node stops generating at once, not after the
    # 30 s the answer would take.
    r = requests.post(f"{c.url}/v1/chat/completions", headers=bearer(c.api), stream=True,
                      json={"model": "snail", "messages": HELLO, "max_tokens": 300,
                            "stream": True}, timeout=60)
    lines = r.iter_lines()
    for _ in range(6):
        next(lines)
    as_balancer = bearer(c.node_secret("node-a"))
    report = requests.get(f"{node.url}/v0/node/report", headers=as_balancer, timeout=10)
    assert report.json()["active_requests"] == 1
    r.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = requests.get(f"{node.url}/v0/node/report", headers=as_balancer,
                              timeout=10).json()
        if report["active_requests"] == 0 and not report["loaded"][0]["busy"]:
            break
        time.sleep(0.1)
    assert report["active_requests"] == 0 and not report["loaded"][0]["busy"], report
    assert c.nodes_json()["node-a"]["in_flight"] == 0


def test_a_client_that_leaves_a_whole_answer_frees_the_node(cluster) -> None:
    c = cluster()
    node = c.start_node("node-a", {"snail": "slow:0.1"})
    port = int(c.url.rsplit(":", 1)[1])

    as_balancer = bearer(c.node_secret("node-a"))

    def node_report() -> dict:
        return requests.get(f"{node.url}/v0/node/report", headers=as_balancer,
                            timeout=10).json()

    # Not streamed: 300 tokens, 30 s of work at the node before the balancer sees a byte.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={**bearer(c.api), "Content-Type":
                                                          "application/json"},
                 body=json.dumps({"model": "snail", "messages": HELLO, "max_tokens": 300}))
    deadline = time.monotonic() + 30
    while node_report()["active_requests"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node_report()["active_requests"] == 1
    conn.close()  # the client gives up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        report = node_report()
        if report["active_requests"] == 0 and not report["loaded"][0]["busy"]:
            break
        time.sleep(0.1)
    assert report["active_requests"] == 0 and not report["loaded"][0]["busy"], report
    assert c.nodes_json()["node-a"]["in_flight"] == 0
    # Nothing held against the node: the next request is served as usual.
    answer = c.client().chat.completions.create(model="snail", messages=HELLO, max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_a_node_without_internet_gets_the_model_through_the_balancer(cluster) -> None:
    c = cluster(balancer_models={"tiny-gguf": "llama-gguf"})
    node = c.start_node("offline-node", {}, LLMLB_DOWNLOAD_ALLOWLIST="none")
    raw = c.client().chat.completions.with_raw_response.create(
        model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert raw.headers["X-LLMLB-Node"] == "offline-node"
    assert raw.parse().usage.completion_tokens == 2
    synced = c.home.parent / "offline-node" / "models" / "tiny-gguf" / "model.gguf"
    assert synced.read_bytes() == (c.home / "models" / "tiny-gguf" / "model.gguf").read_bytes()
    assert "GET /v1/models/blob/tiny-gguf/model.gguf" in c.balancer.log()
    assert "downloading from the balancer" in node.log()
    c.wait(lambda ns: ns["offline-node"]["models"] == ["tiny-gguf"])


def test_node_keys_both_ways(cluster) -> None:
    c = cluster()
    node = c.start_node("node-a", {"tiny-gguf": "llama-gguf"})
    register = {"name": "intruder", "url": "http://127.0.0.1:9", "report": {}}
    assert requests.post(f"{c.url}/v0/nodes", json=register, timeout=10).status_code == 401
    r = requests.post(f"{c.url}/v0/nodes", json=register, headers=bearer("sk-wrong"),
                      timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(f"{c.url}/v0/nodes", json=register, headers=bearer(c.api), timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert requests.get(f"{c.url}/v0/nodes", headers=bearer(c.api),
                        timeout=10).status_code == 403
    # The node refuses the balancer's api keys, the shared node key (every node has it) and
    # anonymous calls, on /v1 and its own API: only the balancer holding its secret gets in.
    for path in ("/v1/models", "/v0/node/report"):
        assert requests.get(f"{node.url}{path}", timeout=10).status_code == 401
        for key in (c.api, c.node_key):
            r = requests.get(f"{node.url}{path}", headers=bearer(key), timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{node.url}{path}", headers=bearer(c.node_secret("node-a")),
                            timeout=10).status_code == 200
    assert requests.post(f"{node.url}/v1/chat/completions", headers=bearer(c.api), timeout=10,
                         json={"model": "tiny-gguf", "messages": HELLO}).status_code == 401
    # A node with a wrong key is refused, says why, and never gets traffic.
    wrong = c.start_node("node-w", {"tiny-gguf": "llama-gguf"}, wait=False, key="sk-wrong")
    deadline = time.monotonic() + 60
    while "refused this node's registration" not in wrong.log() \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "LLMLB_NODE_API_KEY must be a key with the node scope" in wrong.log()
    assert set(c.nodes_json()) == {"node-a"}


def test_affinity_sends_a_conversation_back_to_the_same_node(cluster) -> None:
    c = cluster()
    c.start_node("node-a", {"tiny-gguf": "llama-gguf"})
    c.start_node("node-b", {"tiny-gguf": "llama-gguf"})
    client = c.client()
    used: set[str] = set()
    for n in range(8):
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Conversation {n}: tell me about Paris."}]
        nodes = []
        for turn in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="tiny-gguf", messages=messages, max_tokens=3, temperature=0)
            nodes.append(raw.headers["X-LLMLB-Node"])
            messages = [*messages, {"role": "assistant",
                                    "content": raw.parse().choices[0].message.content},
                        {"role": "user", "content": f"And turn {turn + 2}?"}]
        assert len(set(nodes)) == 1, f"conversation {n} moved: {nodes}"
        used |= set(nodes)
    assert used == {"node-a", "node-b"}  # conversations spread over the nodes


def test_affinity_yields_to_the_load_bound(cluster) -> None:
    c = cluster()
    c.start_node("node-a", {"snail": "slow:0.05"})
    c.start_node("node-b", {"snail": "slow:0.05"})
    # Eight requests of one conversation at once: its node takes them only up to the bound
    # (1.25 x the average load), the rest go to the other node.
    served = concurrently(c, "snail", ["the same conversation"] * 8)
    assert set(served) == {"node-a", "node-b"} and max(served.values()) <= 6, served


def test_a_lone_failing_node_cools_down_without_a_retry_storm(cluster) -> None:
    c = cluster()
    node = c.start_node("node-a", {"snail": "slow:0.1"}, LLMLB_MAX_QUEUED_REQUESTS="1")
    (c.home.parent / "node-a" / "models" / "broken").mkdir()
    (c.home.parent / "node-a" / "models" / "broken" / "model.gguf").write_bytes(b"GGUF" * 8)
    c.wait(lambda ns: "broken" in ns["node-a"]["models"])
    client = c.client()
    # A node's own 5xx reaches the client as it was (status and code), and cools the node.
    with pytest.raises(openai.InternalServerError) as broken:
        client.chat.completions.create(model="broken", messages=HELLO, max_tokens=2)
    assert broken.value.status_code == 500
    assert broken.value.body["code"] == "model_load_failed"
    with pytest.raises(openai.APIStatusError) as cooling:
        client.chat.completions.create(model="snail", messages=HELLO, max_tokens=2)
    assert cooling.value.status_code == 503 and cooling.value.body["code"] == "no_node_available"
    assert int(cooling.value.response.headers["Retry-After"]) >= 1
    time.sleep(0.7)  # LLMLB_COOLDOWN_SECONDS=0.5: the node gets traffic again
    assert client.chat.completions.create(model="snail", messages=HELLO,
                                          max_tokens=1).usage.completion_tokens == 1

    # A node's 503 with Retry-After is honoured: no traffic to it for that long.
    def long_answer() -> None:
        client.chat.completions.create(model="snail", messages=HELLO, max_tokens=30)

    streams = [threading.Thread(target=long_answer) for _ in range(2)]
    for t in streams:
        t.start()
    deadline = time.monotonic() + 20  # one generating, one waiting: the node's queue is full
    while time.monotonic() < deadline:
        report = requests.get(f"{node.url}/v0/node/report",
                              headers=bearer(c.node_secret("node-a")), timeout=10).json()
        if any(m.get("waiting") for m in report["loaded"]):
            break
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as busy:
        client.chat.completions.create(model="snail", messages=HELLO, max_tokens=1)
    assert busy.value.status_code == 503 and busy.value.body["code"] == "model_busy"
    assert busy.value.response.headers["X-LLMLB-Node"] == "node-a"
    asked = node.log().count("POST /v1/chat/completions")
    for _ in range(5):
        with pytest.raises(openai.APIStatusError) as cooling:
            client.chat.completions.create(model="snail", messages=HELLO, max_tokens=1)
        assert cooling.value.body["code"] == "no_node_available"
    assert node.log().count("POST /v1/chat/completions") == asked  # the node was left alone
    for t in streams:
        t.join()

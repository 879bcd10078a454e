"""The cluster's members cannot harm it (SC-7, SC-8): a node's name is its own, whoever holds
the shared node key; nothing a node advertises or reports breaks the balancer for the others.
Real `llmlb serve --role balancer` and `llmlb node` processes on loopback."""

from __future__ import annotations

import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from llmlb.state import open_database

from .conftest import HELLO
from .test_balancer import bearer, cluster  # noqa: F401 - the fixture

CLOSED = "http://127.0.0.1:9"


def wait_log(proc, text: str, timeout: float = 60) -> None:  # noqa: ANN001 - a Proc
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{proc.log()[-3000:]}"
        time.sleep(0.1)


def test_a_nodes_name_is_its_own(cluster) -> None:  # noqa: F811
    c = cluster()
    real = c.start_node("gpu-a", {"tiny-gguf": "llama-gguf"})
    real_url = c.nodes_json()["gpu-a"]["url"]
    as_node = bearer(c.node_key)

    # The shared node key with another secret: refused, saying what an operator can do.
    claim = {"name": "gpu-a", "url": CLOSED, "secret": "x" * 32,
             "report": {"models": [{"id": "tiny-gguf"}]}}
    r = requests.post(f"{c.url}/v0/nodes", json=claim, headers=as_node, timeout=10)
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "name_taken" and "DELETE /v0/nodes/gpu-a" in error["message"]
    beat = {"secret": "x" * 32, "report": {"models": [{"id": "evil"}]}}
    r = requests.post(f"{c.url}/v0/nodes/gpu-a/heartbeat", json=beat, headers=as_node,
                      timeout=10)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken", r.text
    r = requests.post(f"{c.url}/v0/nodes/gpu-a/heartbeat", json={"report": {}},
                      headers=as_node, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "secret", r.text
    r = requests.post(f"{c.url}/v0/nodes", json={**claim, "name": "local"}, headers=as_node,
                      timeout=10)
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken", r.text

    # A second node process, with the node key, started as gpu-a: it gets nowhere, and both
    # sides say so.
    impostor = c.start_node("gpu-a", {"tiny-gguf": "llama-gguf"}, wait=False,
                            node_dir="impostor")
    wait_log(impostor, "refused this node's registration")
    assert "belongs to another node" in impostor.log()
    wait_log(c.balancer, "Refused a node registration as 'gpu-a' from 127.0.0.1")
    nodes = c.nodes_json()
    assert nodes["gpu-a"]["url"] == real_url and nodes["gpu-a"]["models"] == ["tiny-gguf"]
    assert set(nodes) == {"gpu-a"}
    client = c.client()
    for n in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-gguf", messages=[{"role": "user", "content": f"hi {n}"}], max_tokens=2)
        assert raw.headers["X-LLMLB-Node"] == "gpu-a"
    assert "POST /v1/chat/completions" in real.log()
    assert "POST /v1/chat/completions" not in impostor.log()

    # The node key acts on no node: it cannot delete gpu-a's models or make it pull.
    r = requests.delete(f"{real.url}/v0/node/models/tiny-gguf", headers=as_node, timeout=10)
    assert r.status_code == 401, r.text
    r = requests.post(f"{real.url}/v0/node/pull", json={"model_id": "tiny-gguf"},
                      headers=as_node, timeout=10)
    assert r.status_code == 401, r.text
    assert (c.home.parent / "gpu-a" / "models" / "tiny-gguf").is_dir()
    assert client.chat.completions.create(model="tiny-gguf", messages=HELLO,
                                          max_tokens=1).usage.completion_tokens == 1

    # An admin who forgets the node frees its name: here the other process takes it.
    real.stop()
    r = requests.delete(f"{c.url}/v0/nodes/gpu-a", headers=bearer(c.admin), timeout=10)
    assert r.status_code == 200, r.text
    c.wait(lambda ns: ns.get("gpu-a", {}).get("url") == impostor.url
           and ns["gpu-a"]["status"] == "online")


BAD_URLS = ["http://127.0.0.1:99999", "http://[::1", "http://127.0.0.1:1/x\r\nX-Evil: 1",
            "http://127.0.0.1:1\n", "http://user:pw@127.0.0.1:1", "ftp://127.0.0.1:1",
            "http://:80", "http://127.0.0.1:0", "http://127.0.0.1:1/?q=1", "http://h\x00st:1",
            "http://127.0.0.1:x", 5, None]
BAD_REPORTS = [
    ({"models": [{"id": ["x"]}]}, "report.models[0].id"),
    ({"active_requests": "many"}, "report.active_requests"),
    ({"queued_requests": -1}, "report.queued_requests"),
    ({"models": "all of them"}, "report.models"),
    ({"models": [{"object": "model"}]}, "report.models[0].id"),
    ({"hardware": {"gpu_count": 1, "vram_free_bytes": "lots"}}, "report.hardware.vram_free_bytes"),
    ({"hardware": {"gpus": [{"name": 5}]}}, "report.hardware.gpus[0].name"),
    ({"downloads": [{"model_id": "m", "status": "downloading", "progress": 7}]},
     "report.downloads[0].progress"),
    ({"loaded": [{"id": "m", "waiting": True}]}, "report.loaded[0].waiting"),
    ({"can_download": "yes"}, "report.can_download"),
    ([], "report"),
]


def test_nothing_a_member_reports_breaks_the_balancer(cluster) -> None:  # noqa: F811
    c = cluster()
    c.start_node("gpu-a", {"tiny-gguf": "llama-gguf"})
    as_node = bearer(c.node_key)
    good = {"models": [{"id": "other-model"}]}

    for i, url in enumerate(BAD_URLS):
        r = requests.post(f"{c.url}/v0/nodes", headers=as_node, timeout=10, json={
            "name": f"bad-url-{i}", "url": url, "secret": "s" * 32, "report": good})
        assert r.status_code == 400 and r.json()["error"]["param"] == "url", (url, r.text)
    for i, (report, field) in enumerate(BAD_REPORTS):
        r = requests.post(f"{c.url}/v0/nodes", headers=as_node, timeout=10, json={
            "name": f"bad-report-{i}", "url": CLOSED, "secret": "s" * 32, "report": report})
        assert r.status_code == 400, (report, r.text)
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    # A node's malformed heartbeat is refused; its last good report stays.
    r = requests.post(f"{c.url}/v0/nodes", headers=as_node, timeout=10, json={
        "name": "flaky", "url": CLOSED, "secret": "f" * 32, "report": good})
    assert r.status_code == 201, r.text
    r = requests.post(f"{c.url}/v0/nodes/flaky/heartbeat", headers=as_node, timeout=10,
                      json={"secret": "f" * 32, "report": {"active_requests": "many"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "report.active_requests"
    assert c.nodes_json()["flaky"]["models"] == ["other-model"]

    # Rows stored before URLs and reports were checked (an older llmlb wrote them).
    legacy = {"legacy-port": ("http://127.0.0.1:99999", '{"models": [{"id": "old-model"}]}'),
              "legacy-ipv6": ("http://[::1", '{"models": [{"id": "old-model"}]}'),
              "legacy-report": (CLOSED, '{"models": [{"id": ["x"]}], "active_requests": "many",'
                                ' "hardware": {"gpu_count": 1}}'),
              "legacy-json": (CLOSED, "not json")}
    db = open_database(c.home / "llmlb.db")
    with db.engine.transaction() as conn:
        for name, (url, report) in legacy.items():
            conn.execute("INSERT INTO nodes(name, kind, url, secret, report, registered_at, "
                         "last_seen) VALUES (?, 'node', ?, ?, ?, ?, ?)",
                         (name, url, "s" * 32, report, time.time(), time.time()))
    db.close()

    # Everyone else's service goes on; the admin sees the broken ones and forgets them.
    client = c.client()
    assert {m.id for m in client.models.list().data} == {"tiny-gguf", "other-model"}
    assert client.models.retrieve("tiny-gguf").id == "tiny-gguf"
    raw = client.chat.completions.with_raw_response.create(model="tiny-gguf", messages=HELLO,
                                                           max_tokens=2)
    assert raw.headers["X-LLMLB-Node"] == "gpu-a" and raw.parse().usage.completion_tokens == 2
    metrics = requests.get(f"{c.url}/metrics", headers=bearer(c.api), timeout=10)
    assert metrics.status_code == 200, metrics.text
    up = {s.labels["node"]: s.value for f in text_string_to_metric_families(metrics.text)
          for s in f.samples if s.name == "llmlb_node_up"}
    assert up["gpu-a"] == 1 and up["legacy-port"] == 0 and up["flaky"] == 1
    assert requests.get(f"{c.url}/api/models", headers=bearer(c.admin),
                        timeout=10).status_code == 200
    nodes = c.nodes_json()
    for name in legacy:
        assert nodes[name]["status"] == "offline" and nodes[name]["last_error"], nodes[name]
    assert "port" in nodes["legacy-port"]["last_error"].lower()
    assert "report.models[0].id" in nodes["legacy-report"]["last_error"]
    assert nodes["gpu-a"]["status"] == "online"
    for name in legacy:
        r = requests.delete(f"{c.url}/v0/nodes/{name}", headers=bearer(c.admin), timeout=10)
        assert r.status_code == 200, r.text
    assert set(c.nodes_json()) == {"gpu-a", "flaky"}

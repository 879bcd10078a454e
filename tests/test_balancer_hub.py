"""The model hub on a balancer: pulls go to a node that can fetch the model and has the
memory, progress and Ready come from the nodes' reports, deletes reach the node."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import requests

from .conftest import HELLO, artifact, write_catalog
from .fake_hub import FakeHub
from .test_balancer import bearer, cluster  # noqa: F401 - the fixture

DEV = {"Authorization": "Bearer sk_debug"}


def hub_item(c, model_id: str) -> dict:
    r = requests.get(f"{c.url}/api/models", headers=bearer(c.admin), timeout=10)
    assert r.status_code == 200, r.text
    return next(m for m in r.json()["models"] if m["model"]["id"] == model_id)


def test_pull_goes_to_a_node_that_can_fetch_it_and_delete_follows(
        cluster, hub: FakeHub, tiny, tmp_path: Path) -> None:  # noqa: F811
    gguf = tiny["llama-gguf"]
    hub.add_repo("llmlb-test/tiny-gguf", {"model.gguf": gguf})
    catalog = write_catalog(tmp_path / "catalog.json", [
        {"id": "tiny-gguf", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
         "artifacts": [artifact(gguf, "model.gguf")]},
        {"id": "enormous", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
         "artifacts": [artifact(gguf, "model.gguf")], "required_vram_mb": 10**9},
    ])
    env = {"HF_ENDPOINT": hub.endpoint, "LLMLB_SUPPORTED_MODELS": str(catalog)}
    c = cluster(**env)
    c.start_node("no-internet", {}, LLMLB_DOWNLOAD_ALLOWLIST="none", **env)
    c.start_node("fetcher", {}, **env)
    assert hub_item(c, "tiny-gguf")["status"] == "Available"

    hub.throttle_bps = 200_000  # ~3 s: progress shows on the way
    r = requests.post(f"{c.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=bearer(c.admin), timeout=10)
    assert r.status_code == 202, r.text
    assert r.json() == {"model_id": "tiny-gguf", "status": "Registered", "node": "fetcher"}
    seen, progress = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        item = hub_item(c, "tiny-gguf")
        seen.append(item["status"])
        if item["status"] == "Downloading":
            progress.append(item["progress"])
        if item["status"] == "Ready":
            break
        time.sleep(0.1)
    assert seen[-1] == "Ready", seen
    assert "Downloading" in seen and progress == sorted(progress) and len(set(progress)) >= 2, (seen, progress)
    assert item["available_nodes"] == 1 and item["nodes"] == ["fetcher"]
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1
    time.sleep(6)  # a supervisor round later: nobody resumed the node's pull on the balancer
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1
    assert not (c.home / "models" / "tiny-gguf").exists()

    raw = c.client().chat.completions.with_raw_response.create(
        model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert raw.headers["X-LLMLB-Node"] == "fetcher"

    r = requests.post(f"{c.url}/api/models/register", json={"model_id": "enormous"},
                      headers=bearer(c.admin), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "insufficient_memory"
    assert r.json()["error"]["message"].startswith("Insufficient VRAM. Required: 97656")

    r = requests.delete(f"{c.url}/api/models/tiny-gguf", headers=bearer(c.admin), timeout=10)
    assert r.status_code == 200, r.text
    assert not (c.home.parent / "fetcher" / "models" / "tiny-gguf").exists()
    c.wait(lambda ns: ns["fetcher"]["models"] == [])
    assert hub_item(c, "tiny-gguf")["status"] == "Available"


def test_pull_picks_the_node_with_the_most_free_memory(hub_server, tiny) -> None:
    """A standalone llmlb with a registered GPU node (its report as NVML would give it): the
    pull goes where the model fits best; too big for every node is insufficient_memory."""
    from llmlb.auth import create_api_key

    from .test_dashboard_nodes import gpu_report

    server = hub_server()
    node_key, _ = create_api_key(server.runtime.db, "nodes", "node")
    report = {**gpu_report([]), "downloads": [], "can_download": True}
    requests.post(f"{server.url}/v0/nodes", headers=bearer(node_key), timeout=10,
                  json={"name": "gpu-box", "url": "http://127.0.0.1:9", "secret": "s" * 32,
                        "report": report}).raise_for_status()
    local_free = server.runtime.cluster.local.free_memory()
    gpu_free = report["hardware"]["vram_free_bytes"]
    assert gpu_free > local_free  # 40 GB of VRAM free against this machine's RAM

    r = requests.post(f"{server.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=DEV, timeout=10)
    # Chosen: gpu-box (its address is closed here, so the pull cannot be handed over).
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_node_available"
    assert "gpu-box" in r.json()["error"]["message"]

    report["hardware"]["vram_free_bytes"] = 1024**2  # the GPUs fill up: this machine wins
    requests.post(f"{server.url}/v0/nodes/gpu-box/heartbeat", headers=bearer(node_key),
                  json={"secret": "s" * 32, "report": report}, timeout=10).raise_for_status()
    r = requests.post(f"{server.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=DEV, timeout=10)
    assert r.status_code == 202 and "node" not in r.json()  # pulled in this process


def test_a_pull_whose_node_dies_becomes_an_error(cluster, hub: FakeHub, tiny,  # noqa: F811
                                                 tmp_path: Path) -> None:
    gguf = tiny["llama-gguf"]
    hub.add_repo("llmlb-test/tiny-gguf", {"model.gguf": gguf})
    catalog = write_catalog(tmp_path / "catalog.json", [
        {"id": "tiny-gguf", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
         "artifacts": [artifact(gguf, "model.gguf")]}])
    env = {"HF_ENDPOINT": hub.endpoint, "LLMLB_SUPPORTED_MODELS": str(catalog)}
    c = cluster(**env)
    node = c.start_node("fetcher", {}, **env)
    hub.throttle_bps = 20_000  # half a minute: the node dies long before the end
    r = requests.post(f"{c.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=bearer(c.admin), timeout=10)
    assert r.status_code == 202 and r.json()["node"] == "fetcher", r.text
    deadline = time.monotonic() + 60
    while hub_item(c, "tiny-gguf")["status"] != "Downloading" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hub_item(c, "tiny-gguf")["status"] == "Downloading"

    node.stop(signal.SIGKILL)  # the machine goes away mid-pull
    c.wait(lambda ns: ns["fetcher"]["status"] == "offline")
    item = hub_item(c, "tiny-gguf")
    assert item["status"] == "Error", item
    assert "fetcher" in item["error"] and "offline" in item["error"]

    # Pulled again, it goes to a node that is up.
    c.start_node("rescuer", {}, **env)
    hub.throttle_bps = None
    r = requests.post(f"{c.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=bearer(c.admin), timeout=10)
    assert r.status_code == 202 and r.json()["node"] == "rescuer", r.text
    c.wait(lambda ns: ns["rescuer"]["models"] == ["tiny-gguf"])
    assert hub_item(c, "tiny-gguf")["status"] == "Ready"


def test_a_first_request_pulls_where_the_kv_cache_fits(hub_server, tiny,
                                                      tmp_path: Path) -> None:
    """The proxy's pull for a request counts the KV cache as the hub's does: a GPU node with
    the most free memory, but eight long sequences to hold, is not where the model goes."""
    from llmlb.auth import create_api_key
    from llmlb.node.hardware import node_memory

    from .test_dashboard_nodes import gpu_report

    local_free = node_memory().free_bytes
    # One sequence of 4096 tokens takes a quarter of this machine's free memory.
    per_token = int(local_free * 0.25 / 4096)
    catalog = write_catalog(tmp_path / "kv.json", [{
        "id": "long-context", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
        "required_vram_mb": 1, "kv_cache_bytes_per_token": per_token,
        "artifacts": [artifact(tiny["llama-gguf"], "model.gguf")]}])
    server = hub_server(supported_models=catalog)  # chooses its sequences: one must fit
    node_key, _ = create_api_key(server.runtime.db, "nodes", "node")
    # A node with 40 GB of VRAM free that would hold 8 sequences of 32k tokens: 16 times
    # this machine's free memory in KV cache.
    report = {**gpu_report([]), "downloads": [], "can_download": True,
              "load_options": {"context_length": 32768, "parallel_sequences": 8}}
    gpu_free = report["hardware"]["vram_free_bytes"]
    assert local_free < gpu_free < per_token * 32768 * 8
    requests.post(f"{server.url}/v0/nodes", headers=bearer(node_key), timeout=10,
                  json={"name": "gpu-box", "url": "http://127.0.0.1:9", "secret": "s" * 32,
                        "report": report}).raise_for_status()

    r = requests.post(f"{server.url}/v1/chat/completions", headers=DEV, timeout=120,
                      json={"model": "long-context", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.headers["X-LLMLB-Node"] == "local"
    # gpu-box was never tried (its address is closed: trying it would have failed it).
    nodes = requests.get(f"{server.url}/v0/nodes", headers=DEV, timeout=10).json()
    gpu_box = next(n for n in nodes["data"] if n["name"] == "gpu-box")
    assert gpu_box["status"] == "online" and gpu_box["last_error"] is None, gpu_box

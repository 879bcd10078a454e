"""The model hub API (HB-1..HB-4): statuses, pulls, deletes, stats and WebSocket events."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

from .conftest import LiveServer, artifact, write_catalog
from .fake_hub import FakeHub

DEV = {"Authorization": "Bearer sk_debug"}


def models(server: LiveServer) -> dict[str, dict]:
    r = requests.get(f"{server.url}/api/models", headers=DEV, timeout=10)
    assert r.status_code == 200
    return {m["model"]["id"]: m for m in r.json()["models"]}


def register(server: LiveServer, model_id: str) -> requests.Response:
    return requests.post(f"{server.url}/api/models/register", json={"model_id": model_id},
                         headers=DEV, timeout=10)


def wait_status(server: LiveServer, model_id: str, wanted: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = models(server)[model_id]
        if item["status"] == wanted:
            return item
        time.sleep(0.1)
    raise AssertionError(f"{model_id} never became {wanted}: {models(server)[model_id]}")


def test_catalog_listing_with_stats(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    listed = models(server)
    assert set(listed) == {"tiny-gguf", "tiny-st", "private-gguf", "bad-sha"}
    item = listed["tiny-gguf"]
    assert item["status"] == "Available" and item["available_nodes"] == 0
    assert set(item["model"]) == {"id", "name", "description", "repo", "size_bytes",
                                  "required_memory_bytes", "tags", "capabilities",
                                  "quantization"}
    assert item["model"]["repo"] == "llmlb-test/tiny-gguf"
    assert item["model"]["required_memory_bytes"] == 64 * 1024 * 1024
    # Stats arrive from the hub's model info in the background, then come from the cache.
    deadline = time.monotonic() + 10
    while models(server)["tiny-gguf"]["hf_stats"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert models(server)["tiny-gguf"]["hf_stats"] == {"downloads": 1234, "stars": 56}
    asked = len(hub.requests)
    models(server)
    assert len(hub.requests) == asked  # cached (TTL)


def test_listing_stays_fast_when_the_hub_is_unreachable(hub_server) -> None:
    server = hub_server(hf_endpoint="http://127.0.0.1:9")
    listed = models(server)
    assert all(m["hf_stats"] is None for m in listed.values())
    assert all(m["status"] == "Available" for m in listed.values())


def test_register_errors(hub_server, tmp_path: Path, tiny, hub: FakeHub) -> None:
    server = hub_server()
    r = register(server, "unknown-model")
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "Model 'unknown-model' is not in supported "
                                 "models list", "type": "invalid_request_error",
                                 "code": "model_not_supported", "param": "model_id"}
    huge = write_catalog(tmp_path / "huge.json", [{
        "id": "giant", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
        "required_vram_mb": 64 * 1024 * 1024,
        "artifacts": [artifact(tiny["llama-gguf"], "model.gguf")]}])
    server = hub_server(supported_models=huge)
    r = register(server, "giant")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "resource_error" and error["code"] == "insufficient_memory"
    assert error["message"].startswith("Insufficient VRAM. Required: 65536GB, Available: ")
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 0
    assert requests.post(f"{server.url}/api/models/register", json={}, headers=DEV,
                         timeout=10).status_code == 400


def test_a_pull_must_fit_the_kv_cache_of_every_slot(hub_server, tmp_path: Path, tiny,
                                                   hub: FakeHub) -> None:
    from llmlb.node.hardware import node_memory

    # A model whose weights fit with room to spare, and whose KV cache takes a fifth of the
    # free memory per sequence at the default context of 4096 tokens: one sequence fits,
    # eight do not.
    per_token = int(node_memory().free_bytes * 0.2 / 4096)
    catalog = write_catalog(tmp_path / "kv.json", [{
        "id": "long-context", "source": "hf_gguf", "repo_id": "llmlb-test/tiny-gguf",
        "required_vram_mb": 1, "kv_cache_bytes_per_token": per_token,
        "artifacts": [artifact(tiny["llama-gguf"], "model.gguf")]}])
    server = hub_server(supported_models=catalog, parallel_sequences=8)
    r = register(server, "long-context")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "KV cache" in error["message"] and "8 sequences of 4096 tokens" in error["message"]
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 0

    # Choosing its number of sequences by memory, the node runs it with fewer: it may pull.
    server = hub_server(supported_models=catalog)
    assert register(server, "long-context").status_code == 202
    wait_status(server, "long-context", "Ready")


def test_pull_goes_registered_downloading_ready(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    hub.throttle_bps = 300_000
    r = register(server, "tiny-gguf")
    assert r.status_code == 202 and r.json() == {"model_id": "tiny-gguf",
                                                 "status": "Registered"}
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        item = models(server)["tiny-gguf"]
        seen.append((item["status"], item.get("progress")))
        if item["status"] == "Ready":
            break
        time.sleep(0.1)
    statuses = [s for s, _ in seen]
    assert "Downloading" in statuses and statuses[-1] == "Ready"
    progress = [p for s, p in seen if s == "Downloading"]
    assert progress == sorted(progress) and len(set(progress)) > 2
    ready = models(server)["tiny-gguf"]
    assert ready["available_nodes"] == 1
    assert register(server, "tiny-gguf").json()["status"] == "Ready"  # idempotent
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1


def test_one_download_at_a_time_others_wait_registered(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    hub.throttle_bps = 250_000
    register(server, "tiny-gguf")
    wait_status(server, "tiny-gguf", "Downloading")
    register(server, "tiny-st")
    time.sleep(0.5)
    listed = models(server)
    assert listed["tiny-gguf"]["status"] == "Downloading"
    assert listed["tiny-st"]["status"] == "Registered"
    wait_status(server, "tiny-gguf", "Ready")
    wait_status(server, "tiny-st", "Ready")


def test_failed_pull_shows_error_and_retry_works(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    hub.inject("model.gguf", status=500, method="GET", times=None)
    register(server, "tiny-gguf")
    item = wait_status(server, "tiny-gguf", "Error")
    assert "HTTP 500" in item["error"]
    hub.clear_faults()
    assert register(server, "tiny-gguf").status_code == 202  # Retry
    wait_status(server, "tiny-gguf", "Ready")


def test_delete(hub_server, tiny, tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    shutil.copytree(tiny["llama-st"], shared / "tiny-st")
    server = hub_server(shared_models_dir=shared)
    register(server, "tiny-gguf")
    wait_status(server, "tiny-gguf", "Ready")
    local = requests.get(f"{server.url}/api/models/local", headers=DEV, timeout=10).json()
    by_id = {m["id"]: m for m in local["models"]}
    assert by_id["tiny-gguf"]["deletable"] and not by_id["tiny-st"]["deletable"]

    r = requests.delete(f"{server.url}/api/models/tiny-gguf", headers=DEV, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Available"
    assert not (server.models_dir / "tiny-gguf").exists()
    assert models(server)["tiny-gguf"]["status"] == "Available"

    r = requests.delete(f"{server.url}/api/models/tiny-st", headers=DEV, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "shared_model"
    assert (shared / "tiny-st" / "model.safetensors").exists()
    r = requests.delete(f"{server.url}/api/models/never-heard-of", headers=DEV, timeout=10)
    assert r.status_code == 404


def test_delete_during_download_is_refused(hub_server, hub: FakeHub) -> None:
    server = hub_server()
    hub.throttle_bps = 200_000
    register(server, "tiny-gguf")
    wait_status(server, "tiny-gguf", "Downloading")
    r = requests.delete(f"{server.url}/api/models/tiny-gguf", headers=DEV, timeout=10)
    assert r.status_code == 409 and r.json()["error"]["code"] == "download_in_progress"


def test_hub_needs_admin(hub_server) -> None:
    server = hub_server(dev=False)
    from llmlb import auth

    key, _ = auth.create_api_key(server.runtime.db, "inference", "api")
    r = requests.get(f"{server.url}/api/models", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 403
    assert requests.get(f"{server.url}/api/models", timeout=10).status_code == 401


def collect_events(url: str, stop: threading.Event, into: list[dict],
                   headers: dict | None = None) -> threading.Thread:
    ready = threading.Event()

    def run() -> None:
        with connect(url, additional_headers=headers or {}) as ws:
            ready.set()
            while not stop.is_set():
                try:
                    into.append(json.loads(ws.recv(timeout=0.2)))
                except TimeoutError:
                    continue

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    return thread


def test_websocket_events_from_another_worker(hub_server, hub: FakeHub,
                                              llmlb_home: Path) -> None:
    """Two app instances sharing one home stand for two gunicorn workers: the pull runs in
    one, the WebSocket client listens to the other, and still sees every step."""
    downloader = hub_server()
    listener = hub_server()
    hub.throttle_bps = 200_000
    events: list[dict] = []
    stop = threading.Event()
    thread = collect_events(listener.url.replace("http", "ws") + "/ws/models", stop, events)
    register(downloader, "tiny-gguf")
    wait_status(listener, "tiny-gguf", "Ready")
    deadline = time.monotonic() + 10
    while not any(e["model_id"] == "tiny-gguf" and e["status"] == "Ready" for e in events):
        assert time.monotonic() < deadline, events
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    mine = [e for e in events if e["model_id"] == "tiny-gguf"]
    assert all(e["type"] == "ModelStatusChanged" for e in mine)
    assert mine[-1]["status"] == "Ready"
    progress = [e["progress"] for e in mine if e["status"] == "Downloading"]
    assert len(progress) >= 3 and progress == sorted(progress)
    assert all(abs(p * 100 - round(p * 100)) < 1e-9 for p in progress)  # whole-% steps


def watching() -> bool:
    """Whether this process watches the models' state for WebSocket clients (a thread that
    reads the shared state five times a second while anyone listens)."""
    return any(t.name == "llmlb-status-events" and t.is_alive() for t in threading.enumerate())


def test_disconnected_clients_free_their_subscription(hub_server) -> None:
    server = hub_server()
    url = server.url.replace("http", "ws") + "/ws/models"
    for _ in range(3):
        with connect(url):
            deadline = time.monotonic() + 5
            while not watching():
                assert time.monotonic() < deadline, "no watcher while a client listens"
                time.sleep(0.05)
    # Once every client has gone, the process stops watching: nothing keeps it busy.
    deadline = time.monotonic() + 5
    while watching() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not watching()

"""The hub across real processes: the seed's WebSocket client against gunicorn workers, and
a pull cut off by a restart that carries on afterwards."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import requests
import websockets

from .conftest import free_port, gunicorn_command, llmlb_command
from .fake_hub import FakeHub

DEV = {"Authorization": "Bearer sk_debug"}


def env_for(home: Path, hub: FakeHub, catalog: Path, port: int, **extra: str) -> dict:
    return {"LLMLB_HOME": str(home), "HF_ENDPOINT": hub.endpoint, "LLMLB_DEV": "1",
            "LLMLB_SUPPORTED_MODELS": str(catalog), "LLMLB_PORT": str(port),
            "LLMLB_PLUGINS_DIR": str(home / "plugins"), **extra}


async def seed_client(uri: str, printed: list[str], stop: asyncio.Event) -> None:
    """The client of seed 003, collecting what it would print."""
    async with websockets.connect(uri) as ws:
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                continue
            event = json.loads(message)
            if event["type"] == "ModelStatusChanged":
                printed.append(f"Model {event['model_id']}: {event['status']}")
                if event.get("progress"):
                    printed.append(f"  Progress: {event['progress'] * 100:.1f}%")


def test_seed_websocket_clients_on_every_worker(start_process, llmlb_home: Path,
                                                hub: FakeHub, published: Path) -> None:
    port = free_port()
    # Six sockets may all land on one worker: allow that many per worker.
    env = env_for(llmlb_home, hub, published, port, LLMLB_WORKERS="2", LLMLB_THREADS="8",
                  LLMLB_MAX_WEBSOCKETS="7")
    proc = start_process([*gunicorn_command(), "-c", "gunicorn.conf.py", "wsgi:app"], env, port)
    hub.throttle_bps = 150_000
    outputs: list[list[str]] = [[] for _ in range(6)]

    async def main() -> None:
        stop = asyncio.Event()
        uri = f"ws://127.0.0.1:{port}/ws/models"
        clients = [asyncio.create_task(seed_client(uri, out, stop)) for out in outputs]
        await asyncio.sleep(0.5)
        r = await asyncio.to_thread(requests.post, f"{proc.url}/api/models/register",
                                    json={"model_id": "tiny-gguf"}, headers=DEV, timeout=10)
        assert r.status_code == 202
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if all("Model tiny-gguf: Ready" in out for out in outputs):
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(main())
    for out in outputs:  # six clients over two workers: each one saw the whole pull
        assert out[-1] == "Model tiny-gguf: Ready", out
        assert "Model tiny-gguf: Downloading" in out
        progress = [float(line.split(": ")[1].rstrip("%")) for line in out
                    if line.startswith("  Progress")]
        assert len(progress) >= 3 and progress == sorted(progress)
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1


def test_pull_interrupted_by_a_restart_resumes(start_process, llmlb_home: Path, hub: FakeHub,
                                              published: Path, tiny) -> None:
    port = free_port()
    env = env_for(llmlb_home, hub, published, port)
    proc = start_process([*llmlb_command(), "serve"], env, port)
    hub.throttle_bps = 150_000
    r = requests.post(f"{proc.url}/api/models/register", json={"model_id": "tiny-gguf"},
                      headers=DEV, timeout=10)
    assert r.status_code == 202

    def hub_status(url: str) -> dict:
        listed = requests.get(f"{url}/api/models", headers=DEV, timeout=10).json()["models"]
        return next(m for m in listed if m["model"]["id"] == "tiny-gguf")

    deadline = time.monotonic() + 30
    while hub_status(proc.url).get("progress", 0) < 0.3 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.stop(signal.SIGKILL)
    assert not (llmlb_home / "models" / "tiny-gguf").exists()

    hub.throttle_bps = 400_000
    restarted = start_process([*llmlb_command(), "serve"], env, port)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = hub_status(restarted.url)["status"]
        seen.append(status)
        if status == "Ready":
            break
        time.sleep(0.1)
    assert seen[-1] == "Ready", seen  # picked up again, never stuck in Downloading
    assert "Downloading" in seen
    resumed = [q for q in hub.requests if q.method == "GET" and "/cdn/" in q.path][-1]
    assert resumed.range and resumed.range.startswith("bytes=")
    data = (llmlb_home / "models" / "tiny-gguf" / "model.gguf").read_bytes()
    assert data == tiny["llama-gguf"].read_bytes()
    assert "Resuming the pull of tiny-gguf" in restarted.log()


def test_events_are_stepped_not_per_chunk(start_process, llmlb_home: Path, hub: FakeHub,
                                          published: Path) -> None:
    port = free_port()
    proc = start_process([*llmlb_command(), "serve"],
                         env_for(llmlb_home, hub, published, port), port)
    hub.throttle_bps = 300_000
    events: list[dict] = []
    stop = threading.Event()

    async def listen() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/models") as ws:
            while not stop.is_set():
                try:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 0.2)))
                except TimeoutError:
                    continue

    thread = threading.Thread(target=lambda: asyncio.run(listen()))
    thread.start()
    time.sleep(0.5)
    requests.post(f"{proc.url}/api/models/register", json={"model_id": "tiny-st"},
                  headers=DEV, timeout=10)
    deadline = time.monotonic() + 30
    while not any(e["status"] == "Ready" for e in events) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join()
    downloading = [e for e in events if e["status"] == "Downloading"]
    # Hundreds of network reads, but at most one event per whole percent, never repeated.
    assert 3 <= len(downloading) <= 101
    assert len({e["progress"] for e in downloading}) == len(downloading)

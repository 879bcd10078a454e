"""Download coordination across real processes (RS-5, RS-6): gunicorn workers share one
download, and a process killed mid-download leaves nothing half-served behind."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import openai
import requests

from .conftest import HELLO, free_port, gunicorn_command, llmlb_command
from .fake_hub import FakeHub

DEV = {"Authorization": "Bearer sk_debug"}


def server_env(llmlb_home: Path, hub: FakeHub, catalog: Path, port: int, **extra: str
               ) -> dict[str, str]:
    return {"LLMLB_HOME": str(llmlb_home), "HF_ENDPOINT": hub.endpoint, "LLMLB_DEV": "1",
            "LLMLB_SUPPORTED_MODELS": str(catalog), "LLMLB_PORT": str(port),
            "LLMLB_PLUGINS_DIR": str(llmlb_home / "plugins"), **extra}


def test_concurrent_requests_across_workers_download_once(
        start_process, llmlb_home: Path, hub: FakeHub, published: Path) -> None:
    port = free_port()
    env = server_env(llmlb_home, hub, published, port, LLMLB_WORKERS="2", LLMLB_THREADS="16")
    # Which worker accepts a connection is the kernel's choice: one worker may take all 20.
    # At most 8 open connections per worker (the command line wins over gunicorn.conf.py)
    # make the second worker take its share while the first waits on the download.
    proc = start_process([*gunicorn_command(), "-c", "gunicorn.conf.py",
                          "--worker-connections", "8", "wsgi:app"], env, port)
    hub.throttle_bps = 300_000  # ~2 s: every request arrives while the download runs

    results: list[object] = []
    workers: set[str] = set()

    def ask() -> None:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="sk_debug", max_retries=0,
                               timeout=120, default_headers={"Connection": "close"})
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny-gguf", messages=HELLO, max_tokens=2)
            workers.add(raw.headers["X-LLMLB-Worker"])
            results.append(raw.parse().usage.completion_tokens)
        except openai.APIError as exc:
            results.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 20, results
    assert len(workers) == 2, "both workers should have served requests"
    assert hub.downloads("llmlb-test/tiny-gguf", "model.gguf") == 1
    log = proc.log()
    assert log.count("Download completed: tiny-gguf") == 1
    assert log.count("Model resolution started: tiny-gguf") >= 2


def test_kill_mid_download_then_restart_resumes(
        start_process, llmlb_home: Path, hub: FakeHub, published: Path, tiny) -> None:
    port = free_port()
    env = server_env(llmlb_home, hub, published, port)
    command = [*llmlb_command(), "serve"]
    proc = start_process(command, env, port)
    hub.throttle_bps = 150_000  # ~4 s for the whole file
    size = tiny["llama-gguf"].stat().st_size

    def doomed_request() -> None:
        with contextlib.suppress(requests.RequestException):  # its server gets killed
            requests.post(f"{proc.url}/v1/chat/completions", headers=DEV, timeout=60,
                          json={"model": "tiny-gguf", "messages": HELLO, "max_tokens": 2})

    threading.Thread(target=doomed_request, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = requests.get(f"{proc.url}/v0/models/tiny-gguf/status", headers=DEV,
                         timeout=10).json()
        if s["status"] == "downloading" and s["progress"] > 0.3:
            break
        time.sleep(0.1)
    proc.stop(signal.SIGKILL)
    served_before = hub.bytes_served("llmlb-test/tiny-gguf", "model.gguf")
    assert 0 < served_before < size

    models = llmlb_home / "models"
    assert not (models / "tiny-gguf").exists()  # nothing half-done is a model
    assert list(models.rglob("model.gguf.partial"))

    hub.throttle_bps = None
    restarted = start_process(command, env, port)
    s = requests.get(f"{restarted.url}/v0/models/tiny-gguf/status", headers=DEV,
                     timeout=10).json()
    assert s["status"] == "error" and "interrupted" in s["error_message"]
    client = openai.OpenAI(base_url=f"{restarted.url}/v1", api_key="sk_debug", max_retries=0)
    assert "tiny-gguf" not in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model="tiny-gguf", messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert (models / "tiny-gguf" / "model.gguf").read_bytes() == tiny["llama-gguf"].read_bytes()
    resumed = [r for r in hub.requests if r.method == "GET" and "/cdn/" in r.path][-1]
    assert resumed.range is not None and resumed.range.startswith("bytes=")
    assert hub.bytes_served("llmlb-test/tiny-gguf", "model.gguf") < 2 * size
    assert not list(models.rglob("*.partial"))

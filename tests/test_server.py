"""llmlb as a user starts it: `llmlb serve`, and gunicorn with several workers sharing state."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import requests

from .conftest import REPO, free_port, gunicorn_command, llmlb_command


def test_llmlb_serve_dev_mode_warns_loudly(start_process, llmlb_home: Path) -> None:
    port = free_port()
    (llmlb_home / "models" / "llama-3.2-1b").mkdir(parents=True)
    (llmlb_home / "models" / "llama-3.2-1b" / "model.gguf").write_bytes(b"GGUF")
    proc = start_process([*llmlb_command(), "serve", "--dev", "--port", str(port)], {}, port)
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="sk_debug", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llama-3.2-1b"]
    assert "DEVELOPMENT MODE" in proc.log()


def test_gunicorn_workers_share_keys(start_process, llmlb_home: Path) -> None:
    port = free_port()
    env = {"LLMLB_WORKERS": "2", "LLMLB_THREADS": "4", "LLMLB_PORT": str(port),
           "LLMLB_DEV": "1"}
    proc = start_process([*gunicorn_command(), "-c", "gunicorn.conf.py", "wsgi:app"], env, port)

    created = requests.post(f"{proc.url}/api/keys", json={"name": "shared", "scopes": ["api"]},
                            headers={"Authorization": "Bearer sk_debug",
                                     "Connection": "close"}, timeout=10)
    assert created.status_code == 201
    creator = created.headers["X-LLMLB-Worker"]
    key = created.json()["key"]

    # New connections land on either worker; the key must work on the one that did not
    # create it (the database, not a process, holds it).
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(seen) < 2:
        r = requests.get(f"{proc.url}/v1/models", headers={"X-API-Key": key,
                                                           "Connection": "close"}, timeout=10)
        assert r.status_code == 200, r.text
        seen[r.headers["X-LLMLB-Worker"]] = r.status_code
    assert len(seen) == 2, f"only saw workers {seen}"
    assert any(pid != creator for pid in seen)
    log = proc.log()
    assert log.count("Booting worker") == 2
    assert log.count("first admin") <= 1


def test_a_bad_catalog_stops_the_start_with_the_reason(llmlb_home: Path) -> None:
    bad = llmlb_home / "catalog.json"
    bad.write_text('{"models": [{"id": "x", "source": "hf_gguf"}]}')
    env = {**os.environ, "LLMLB_HOME": str(llmlb_home), "LLMLB_SUPPORTED_MODELS": str(bad),
           "LLMLB_PORT": str(free_port())}
    for command in ([*llmlb_command(), "serve"],
                    [*gunicorn_command(), "-c", "gunicorn.conf.py", "wsgi:app"]):
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert "models[0] (x): source hf_gguf needs a repo_id" in output, output
        assert "Traceback" not in output and "Worker failed to boot" not in output


def test_a_balancer_stops_cleanly(start_process, llmlb_home: Path) -> None:
    # The balancer runs gevent workers; what an operator reads after Ctrl-C or systemctl stop
    # must end with gunicorn's goodbye, not a traceback.
    port = free_port()
    proc = start_process([*llmlb_command(), "serve", "--role", "balancer", "--dev", "--port",
                          str(port)], {}, port)
    assert requests.get(f"{proc.url}/v1/models", headers={"Authorization": "Bearer sk_debug"},
                        timeout=10).status_code == 200
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(timeout=60) == 0
    log = proc.log()
    assert "Using worker: gevent" in log and "Shutting down: Master" in log
    assert "Traceback" not in log and "Exception ignored" not in log, log

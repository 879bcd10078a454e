"""``GET /metrics`` under gunicorn with two workers (LB-6): what Prometheus reads, parsed with
prometheus_client's own parser, counts every request whichever worker served it, and keeps
counting across a worker's restart; the request history has a row per request."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import HELLO, free_port, gunicorn_command
from .fake_openai import FakeOpenAI

ADMIN = {"Authorization": "Bearer sk_debug"}


def scrape(url: str) -> dict[str, list]:
    r = requests.get(f"{url}/metrics", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.samples
    return families


def total(families: dict[str, list], sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(s.value for s in families.get(family, []) if s.name == sample_name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def ask(url: str, **body) -> requests.Response:
    # A new connection each time, so that the kernel spreads them over both workers.
    return requests.post(f"{url}/v1/chat/completions", timeout=30,
                         headers={**ADMIN, "Connection": "close"},
                         json={"model": "fake-model", "messages": HELLO, **body})


def test_metrics_count_every_request_of_every_worker(start_process, llmlb_home: Path) -> None:
    with FakeOpenAI("gpu", tokens=3) as fake:
        port = free_port()
        site = start_process([*gunicorn_command(), "-c", "gunicorn.conf.py", "wsgi:app"], {
            "LLMLB_PORT": str(port), "LLMLB_WORKERS": "2", "LLMLB_ROLE": "balancer",
            "LLMLB_DEV": "1", "LLMLB_ENDPOINT_CHECK_SECONDS": "0.5"}, port)
        url = site.url
        r = requests.post(f"{url}/v0/endpoints", headers=ADMIN, timeout=30,
                          json={"name": "gpu", "base_url": fake.url})
        assert r.status_code == 201, r.text

        workers = set()
        for _ in range(20):
            r = ask(url)
            assert r.status_code == 200 and r.headers["X-LLMLB-Node"] == "gpu", r.text
            workers.add(r.headers["X-LLMLB-Worker"])
        for _ in range(4):
            r = ask(url, stream=True)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            assert '"usage"' not in r.text  # asked for by llmlb, not passed on
        for _ in range(3):
            assert ask(url, model="no-such-model").status_code == 404
        assert len(workers) == 2, "every request went to one worker: the test proves nothing"

        def counted(ok: int = 24, missing: int = 3) -> dict[str, list]:
            # Each worker writes its counts every FLUSH_SECONDS: the other's come that late
            deadline = time.monotonic() + 10
            while True:
                families = scrape(url)
                if (total(families, "llmlb_requests_total", status="200") >= ok and total(
                        families, "llmlb_requests_total", status="404") >= missing) or \
                        time.monotonic() > deadline:
                    return families
                time.sleep(0.1)

        families = counted()
        assert total(families, "llmlb_requests_total", model="fake-model", node="gpu",
                     status="200") == 24
        assert total(families, "llmlb_requests_total", model="", status="404") == 3
        assert total(families, "llmlb_request_duration_seconds_count", node="gpu") == 24
        assert total(families, "llmlb_time_to_first_token_seconds_count", node="gpu") == 24
        assert total(families, "llmlb_completion_tokens_total", node="gpu") == 24 * 3
        assert total(families, "llmlb_prompt_tokens_total", node="gpu") == 24 * 5
        assert total(families, "llmlb_node_up", node="gpu", kind="endpoint") == 1
        assert total(families, "llmlb_node_status", node="gpu", status="online") == 1
        assert "llmlb_in_flight_requests" in families

        # A worker restarts: its counts stay, folded into one file with the other dead ones.
        metrics_dir = llmlb_home / "metrics"
        victim = int(sorted(workers)[0])
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (metrics_dir / f"counter_{victim}.db").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (metrics_dir / f"counter_{victim}.db").exists()
        assert (metrics_dir / "counter_folded.db").exists()
        families = scrape(url)
        assert total(families, "llmlb_requests_total", node="gpu", status="200") == 24
        assert total(families, "llmlb_request_duration_seconds_count", node="gpu") == 24
        assert ask(url).status_code == 200
        assert total(counted(25), "llmlb_requests_total", node="gpu", status="200") == 25

        rows = []
        deadline = time.monotonic() + 10
        while len(rows) < 28 and time.monotonic() < deadline:
            r = requests.get(f"{url}/v0/requests", headers=ADMIN, params={"limit": 100},
                             timeout=10)
            rows = r.json()["data"]
            time.sleep(0.2)
        # The stopped worker wrote its buffered rows as it exited.
        assert len(rows) == 28, len(rows)
        assert {r["node"] for r in rows if r["status"] == 200} == {"gpu"}
        assert sum(1 for r in rows if r["status"] == 404) == 3
        assert r.status_code == 200

        r = requests.get(f"{url}/metrics", timeout=10)
        assert r.status_code == 401 and r.json()["error"]


def test_a_worker_started_without_llmlbs_master_keeps_live_workers_counts(
        tmp_path: Path, monkeypatch) -> None:
    """gunicorn without gunicorn.conf.py: no master prepared the directory, so each worker
    clears only what dead processes left, never a live sibling's counts."""
    import subprocess

    from llmlb.metrics import ENV, Metrics

    directory = tmp_path / "metrics"
    directory.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (dead.pid, sibling.pid):
            (directory / f"counter_{pid}.db").write_bytes(b"\0" * 16)
        (directory / "counter_folded.db").write_bytes(b"\0" * 16)
        monkeypatch.delenv(ENV, raising=False)
        Metrics(directory, lambda: [])
        left = {p.name for p in directory.iterdir()}
        assert left == {"counter_folded.db", f"counter_{sibling.pid}.db"}
    finally:
        sibling.kill()
        sibling.wait()
    # Nobody alive: a new instance starts from zero.
    monkeypatch.delenv(ENV, raising=False)
    Metrics(directory, lambda: [])
    assert not list(directory.glob("counter_*.db"))


def test_the_kept_process_id_follows_a_fork() -> None:
    # Each worker's metric values and in-flight slot are named by this id: a child that kept
    # its parent's would write over the parent's counts.
    from llmlb import process_id

    assert process_id.current() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, f"{process_id.current()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    kept, actual = os.read(read, 100).decode().split()
    os.waitpid(child, 0)
    assert kept == actual == str(child)


def _in_files(directory: Path) -> float:
    """llmlb_requests_total as another worker's scrape reads it: from the files alone."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))
    return sum(s.value for family in registry.collect() for s in family.samples
               if s.name == "llmlb_requests_total")


def test_counts_held_in_a_worker_reach_the_other_workers(tmp_path: Path, monkeypatch) -> None:
    """A worker holds its increments and writes them every FLUSH_SECONDS, and when it exits:
    the other workers' scrapes see them soon, a restart loses none."""
    from llmlb.metrics import ENV, FLUSH_SECONDS, Metrics

    monkeypatch.delenv(ENV, raising=False)
    directory = tmp_path / "metrics"
    metrics = Metrics(directory, lambda: [])
    metrics.start()
    try:
        metrics.observe("m", "n", 200, 0.01, 0.01, 3, 2)
        deadline = time.monotonic() + FLUSH_SECONDS * 4
        while _in_files(directory) < 1:
            assert time.monotonic() < deadline, "never written while nobody scraped"
            time.sleep(0.05)
    finally:
        metrics.close()
    metrics.observe("m", "n", 200, 0.01, 0.01, 3, 2)
    metrics.observe("m", "n", 500, 0.01, None, None, None)
    metrics.close()  # as a worker exits
    assert _in_files(directory) == 3

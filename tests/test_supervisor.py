"""Work shared by processes: the supervisor's periodic tasks run in exactly one process per
instance, and requests in flight are counted across gunicorn workers."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import requests

from llmlb.balancer.inflight import InflightCounters
from llmlb.supervisor import Supervisor

from .conftest import HELLO
from .test_balancer import bearer, cluster  # noqa: F401 - the fixture


def test_one_supervisor_leads_and_another_takes_over(tmp_path: Path) -> None:
    lock = tmp_path / "llmlb.db.supervisor.lock"
    runs = {"first": 0, "second": 0}

    def task(name: str):
        def run() -> None:
            runs[name] += 1
        return run

    first, second = Supervisor(lock, retry_seconds=0.1), Supervisor(lock, retry_seconds=0.1)
    first.add("tick", 0.05, task("first"))
    second.add("tick", 0.05, task("second"))
    first.start()
    deadline = time.monotonic() + 5
    while runs["first"] < 3:  # the first leads and runs its tasks...
        assert time.monotonic() < deadline, runs
        time.sleep(0.02)
    second.start()
    time.sleep(0.5)  # ...and a second that starts meanwhile only waits for the lock
    assert first.leader and not second.leader
    assert runs["first"] >= 3 and runs["second"] == 0
    assert lock.read_text().split()[-1] == str(os.getpid())  # who leads, for operators

    first.stop()  # as when the leading worker dies: the lock goes, the other takes over
    deadline = time.monotonic() + 5
    while runs["second"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.leader and runs["second"] >= 1
    frozen = runs["first"]
    time.sleep(0.2)
    assert runs["first"] == frozen
    second.stop()


def test_a_failing_task_is_logged_once_and_keeps_running(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="llmlb")
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 5:
            raise ConnectionError("balancer unreachable")

    sup = Supervisor(tmp_path / "lock")
    sup.add("heartbeat", 0.02, flaky)
    sup.start()
    deadline = time.monotonic() + 5
    while len(calls) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    sup.stop()
    assert len(calls) >= 6
    failures = [r for r in caplog.records if "Task heartbeat failed" in r.getMessage()]
    assert len(failures) == 1
    assert any("Task heartbeat works again" in r.getMessage() for r in caplog.records)
    assert sup.describe()["tasks"]["heartbeat"]["last_error"] is None


def _worker_holding(path: Path, node: int, requests: int) -> int:
    """A forked worker process with ``requests`` requests in flight to ``node``, counted in
    ``path``, that holds them until killed; its pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child = InflightCounters(path)
            for _ in range(requests):
                child.enter(node)
            os.write(write, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    os.read(read, 1)
    os.close(read)
    os.close(write)
    return pid


def test_counts_of_a_dead_worker_are_swept(tmp_path: Path) -> None:
    counters = InflightCounters(tmp_path / "x.inflight")
    counters.enter(7)
    pid = _worker_holding(tmp_path / "x.inflight", 7, 2)  # it dies without finishing them
    assert counters.load(7) == 3
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert counters.load(7) == 3  # until someone notices
    assert counters.sweep() == 1
    assert counters.load(7) == 1
    counters.leave(7)
    assert counters.load(7) == 0
    counters.close()


def test_counts_of_workers_that_start_later_are_read(tmp_path: Path) -> None:
    """A reader sums only the slots ever claimed: one claimed after it looked still counts."""
    counters = InflightCounters(tmp_path / "x.inflight")
    counters.enter(3)
    assert counters.load(3) == 1
    children, reads = [], []
    for n in (1, 2):  # two more workers, each with n requests in flight, slots 1 and 2
        children.append(_worker_holding(tmp_path / "x.inflight", 3, n))
        reads.append(counters.load(3))
    try:
        assert reads == [2, 4]
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert counters.sweep() == 2
    assert counters.load(3) == 1
    counters.close()


def test_a_counter_file_of_another_layout_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "x.inflight"
    path.write_bytes(b"LLMLBIF1" + bytes(4096))  # an earlier build's file
    counters = InflightCounters(path)
    counters.enter(5)
    assert counters.load(5) == 1 and path.read_bytes()[:8] == b"LLMLBIF2"
    counters.close()


def _first_use(counters: InflightCounters, start: threading.Barrier,
               failures: list[Exception], sweep: bool) -> None:
    start.wait()
    try:
        if sweep:
            counters.sweep()
        else:
            counters.enter(1)
            counters.load(1)
            counters.leave(1)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        failures.append(exc)


def test_counting_starts_safely_from_many_threads(tmp_path: Path) -> None:
    """The first requests of a worker and the supervisor's sweep arrive together."""
    for trial in range(100):
        counters = InflightCounters(tmp_path / f"{trial}.inflight")
        failures: list[Exception] = []
        start = threading.Barrier(17)
        threads = [threading.Thread(target=_first_use, args=(counters, start, failures, i == 0))
                   for i in range(17)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures and counters.load(1) == 0
        counters.close()


def test_in_flight_counts_and_node_watch_span_gunicorn_workers(cluster) -> None:  # noqa: F811
    c = cluster(LLMLB_WORKERS="2", LLMLB_THREADS="8")
    c.start_node("node-a", {"snail": "slow:0.1"})
    stream = requests.post(f"{c.url}/v1/chat/completions", headers=bearer(c.api), stream=True,
                           json={"model": "snail", "messages": HELLO, "max_tokens": 300,
                                 "stream": True}, timeout=60)
    lines = stream.iter_lines()
    next(lines)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:  # new connections: either worker
        r = requests.get(f"{c.url}/v0/nodes", timeout=10,
                         headers={**bearer(c.admin), "Connection": "close"})
        seen[r.headers["X-LLMLB-Worker"]] = r.json()["data"][0]["in_flight"]
    assert len(seen) == 2 and set(seen.values()) == {1}, seen
    stream.close()
    deadline = time.monotonic() + 10
    while c.nodes_json()["node-a"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.nodes_json()["node-a"]["in_flight"] == 0

    c.nodes["node-a"].stop(signal.SIGKILL)
    c.wait(lambda ns: ns["node-a"]["status"] == "offline", timeout=15)
    time.sleep(1.5)
    assert c.balancer.log().count("Node node-a is offline") == 1  # one watcher, not two


def test_heartbeats_need_no_request_or_client(cluster) -> None:  # noqa: F811
    """Heartbeats run from the node's supervisor with no request or client open."""
    c = cluster()
    c.start_node("node-a", {})
    first = c.nodes_json()["node-a"]["last_heartbeat"]
    done = threading.Event()
    threading.Timer(1.5, done.set).start()
    done.wait()
    assert c.nodes_json()["node-a"]["last_heartbeat"] > first

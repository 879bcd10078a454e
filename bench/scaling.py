"""Two workers on two cores (``bench/balancer.py``'s ``scale`` part, issue 20): a balancer
with 1 worker against 2 workers, each pinned to a core of its own, with gunicorn's shared
accept and with a ``SO_REUSEPORT`` socket per worker (``LLMLB_REUSE_PORT``: gunicorn's
``reuse_port``; ``bench/gunicorn_scale.py`` pins the workers); the nginx
upstream and wrk unpinned (on a 2-core machine they take their share from the workers).
Reports requests/s at 64 connections, the ratio to 1 worker and each worker's share of the
CPU (how evenly the connections were spread).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import proxybench
from common import VENV_BIN, WORK_ROOT, Proc, clean_env, free_port, proc_stat, start_server

WORK = WORK_ROOT / "balancer"
PATH = "/v1/chat/completions"


def _gunicorn_balancer(home: Path, port: int, upstream_port: int, workers: int,
                       reuseport: bool, log: Path) -> tuple[Proc, str]:
    import requests

    keys = proxybench.make_keys(home, None)
    env = clean_env(LLMLB_HOME=str(home), LLMLB_ROLE="balancer", LLMLB_PORT=str(port),
                    LLMLB_WORKERS=str(workers), LLMLB_LOG_LEVEL="WARNING",
                    HF_ENDPOINT="http://127.0.0.1:9", BENCH_PIN="1",
                    LLMLB_REUSE_PORT=str(int(reuseport)))
    proc = start_server([str(VENV_BIN / "gunicorn"), "-c", "bench/gunicorn_scale.py",
                         "wsgi:app"], env, log, port, name="balancer")
    r = requests.post(f"http://127.0.0.1:{port}/v0/endpoints", timeout=30,
                      headers={"Authorization": f"Bearer {keys['admin']}"},
                      json={"name": "up", "base_url": f"http://127.0.0.1:{upstream_port}/v1"})
    r.raise_for_status()
    return proc, keys["api"]


def connections(pids: list[int], port: int) -> list[int]:
    """Established connections to ``port`` each process holds (how the accept spread them)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        counts.append(sum(1 for fd in fds.iterdir() if _link(fd) in inodes))
    return counts


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def _cpu(pids: list[int]) -> list[float]:
    return [sum(proc_stat(p)[2:4]) / os.sysconf("SC_CLK_TCK") for p in pids]


CONFIGS = (("1 worker", 1, False), ("2 workers, gunicorn's shared accept", 2, False),
           ("2 workers, SO_REUSEPORT per worker", 2, True))


def _one(name: str, workers: int, reuseport: bool, upstream_port: int, seconds: float,
         connections_: int, round_: int) -> dict:
    from common import Monitor

    port = free_port()
    tag = f"{workers}-{int(reuseport)}"
    lb, api = _gunicorn_balancer(WORK / f"scale-home-{tag}", port, upstream_port, workers,
                                 reuseport, WORK / f"scale-{tag}-round{round_}.log")
    try:
        url = f"http://127.0.0.1:{port}{PATH}"
        proxybench.wrk(url, connections_, 2, api, WORK, core=None)  # warm up
        pids = lb.children()
        before = _cpu(pids)
        monitor = Monitor()
        monitor.start()
        spread: list[int] = []
        sampler = threading.Timer(min(2.0, seconds / 2),
                                  lambda: spread.extend(connections(pids, port)))
        sampler.start()
        result = proxybench.wrk(url, connections_, seconds, api, WORK, core=None)
        sampler.join()
        others = monitor.foreign()
        used = [a - b for a, b in zip(_cpu(pids), before, strict=True)]
    finally:
        lb.stop()
    out = {**result, "worker_cpu_s": [round(u, 2) for u in used],
           "worker_cpu_share": [round(u / max(sum(used), 1e-9), 2) for u in used],
           "cpu_us": round(sum(used) / max(1, result["requests"]) * 1e6, 1),
           "others": round(others, 2), "connections_per_worker": spread}
    print(f"  {name:38s} {result['rps']:>8} req/s, p99 {result['p99_us'] / 1000:.1f} ms, "
          f"errors {result['errors']} (non-2xx {result['non2xx']}, socket "
          f"{result['socket_errors']}), connections per worker {spread}, CPU per worker "
          f"{out['worker_cpu_share']}, "
          f"{out['cpu_us']} us CPU/request, other processes {others:.0%} of the cores",
          flush=True)
    return out


def part_scale(seconds: float, connections: int = 64, rounds: int = 3) -> dict:
    """``rounds`` rounds of the three set-ups in a rotating order; per set-up the round with
    the median requests/s."""
    json_port, sse_port = free_port(), free_port()
    upstream = proxybench.start_upstream_nginx(json_port, sse_port, WORK, core=None)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    try:
        for n in range(rounds):
            for name, workers, reuseport in CONFIGS[n % 3:] + CONFIGS[:n % 3]:
                runs[name].append(_one(name, workers, reuseport, json_port, seconds,
                                       connections, n))
    finally:
        upstream.stop()
    out: dict = {"connections": connections, "rounds": rounds}
    for name, results in runs.items():
        ordered = sorted(results, key=lambda r: r["rps"])
        out[name] = {**ordered[len(ordered) // 2], "all_rps": [r["rps"] for r in results]}
    one = out["1 worker"]["rps"]
    for name in runs:
        out[name]["vs_1_worker"] = round(out[name]["rps"] / one, 2)
    return out


def scale_table(scale: dict) -> str:
    lines = [f"| {scale['connections']} connections, median of {scale['rounds']} | req/s | "
             "× 1 worker | p99 | errors | CPU per request | connections per worker | CPU "
             "share per worker | other processes' share of the cores |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in scale.items():
        if isinstance(r, dict):
            every = ", ".join(f"{x:,.0f}" for x in r["all_rps"])
            shares = " / ".join(f"{x:.0%}" for x in r["worker_cpu_share"])
            lines.append(f"| {name} | {r['rps']:,.0f} ({every}) | {r['vs_1_worker']:.2f} | "
                         f"{proxybench._us(r['p99_us'])} | {r['errors']} | "
                         f"{proxybench._us(r['cpu_us'])} | "
                         f"{' / '.join(map(str, r['connections_per_worker']))} | {shares} | "
                         f"{r['others']:.0%} |")
    return "\n".join(lines)

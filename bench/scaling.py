"""Two workers on two cores (``bench/balancer.py``'s ``scale`` part, issue 20): a balancer
with 1 worker against 2 workers, each pinned to a core of its own, with gunicorn's shared
accept and with a ``SO_REUSEPORT`` socket per worker (``LLMLB_REUSE_PORT``: gunicorn's
``reuse_port``; ``bench/gunicorn_scale.py`` pins the workers); the nginx
upstream and wrk unpinned (on a 2-core machine they take their share from the workers).
Reports requests/s at 64 connections, the ratio to 1 worker and each worker's share of the
CPU (how evenly the connections were spread); and how many cores the workers had, with their
requests/s per core they had: on two cores, wrk, the upstream and the kernel's loopback take
what two workers would need to show 2× (half a core at ~9,000 requests/s).
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


def _machine() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat: user, nice, system, idle, iowait,
    irq, softirq, ...), in clock ticks."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


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
        before, machine = _cpu(pids), _machine()
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
        ticks = [a - b for a, b in zip(_machine(), machine, strict=True)]
    finally:
        lb.stop()
    seconds_ = result["duration_us"] / 1e6
    cores = os.cpu_count() or 1
    # What the workers had of the machine, and where the rest went: the kernel's loopback
    # (softirq), wrk and the nginx upstream (the rest of the busy time), nothing (idle).
    worker_cores = sum(used) / seconds_
    out_machine = {"idle_cores": round(ticks[3] / sum(ticks) * cores, 2),
                   "softirq_cores": round(ticks[6] / sum(ticks) * cores, 2)}
    out = {**result, "worker_cpu_s": [round(u, 2) for u in used],
           "worker_cores": round(worker_cores, 2),
           "rps_per_worker_core": round(result["rps"] / max(worker_cores, 1e-9), 1),
           **out_machine,
           "worker_cpu_share": [round(u / max(sum(used), 1e-9), 2) for u in used],
           "cpu_us": round(sum(used) / max(1, result["requests"]) * 1e6, 1),
           "others": round(others, 2), "connections_per_worker": spread}
    print(f"  {name:38s} {result['rps']:>8} req/s, p99 {result['p99_us'] / 1000:.1f} ms, "
          f"errors {result['errors']} (non-2xx {result['non2xx']}, socket "
          f"{result['socket_errors']}), connections per worker {spread}, CPU per worker "
          f"{out['worker_cpu_share']}, "
          f"{out['cpu_us']} us CPU/request, workers had {out['worker_cores']} cores "
          f"({out['rps_per_worker_core']} req/s per core; softirq {out['softirq_cores']}, "
          f"idle {out['idle_cores']}), other processes {others:.0%} of the cores",
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
    one, per_core = out["1 worker"]["rps"], out["1 worker"]["rps_per_worker_core"]
    for name in runs:
        out[name]["vs_1_worker"] = round(out[name]["rps"] / one, 2)
        out[name]["per_core_vs_1_worker"] = round(out[name]["rps_per_worker_core"] / per_core, 2)
    return out


def scale_table(scale: dict) -> str:
    lines = [f"| {scale['connections']} connections, median of {scale['rounds']} | req/s | "
             "× 1 worker | p99 | errors | CPU per request | connections per worker | CPU "
             "share per worker | cores the workers had | req/s per worker core (× 1 worker) | "
             "kernel's loopback (softirq), idle | other processes' share of the cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in scale.items():
        if isinstance(r, dict):
            every = ", ".join(f"{x:,.0f}" for x in r["all_rps"])
            shares = " / ".join(f"{x:.0%}" for x in r["worker_cpu_share"])
            lines.append(f"| {name} | {r['rps']:,.0f} ({every}) | {r['vs_1_worker']:.2f} | "
                         f"{proxybench._us(r['p99_us'])} | {r['errors']} | "
                         f"{proxybench._us(r['cpu_us'])} | "
                         f"{' / '.join(map(str, r['connections_per_worker']))} | {shares} | "
                         f"{r['worker_cores']:.2f} | {r['rps_per_worker_core']:,.0f} "
                         f"({r['per_core_vs_1_worker']:.2f}) | {r['softirq_cores']:.2f}, "
                         f"{r['idle_cores']:.2f} cores | {r['others']:.0%} |")
    return "\n".join(lines)

"""Two workers on two cores (``bench/balancer.py``'s ``scale`` part, issue 20): a balancer
with 1 worker against 2 workers, each pinned to a core of its own, with gunicorn's shared
accept and with a ``SO_REUSEPORT`` socket per worker (``bench/gunicorn_scale.py``); the nginx
upstream and wrk unpinned (on a 2-core machine they take their share from the workers).
Reports requests/s at 64 connections, the ratio to 1 worker and each worker's share of the
CPU (how evenly the connections were spread).
"""

from __future__ import annotations

import os
from pathlib import Path

import proxybench
from common import VENV_BIN, WORK_ROOT, Proc, clean_env, free_port, proc_stat, start_server

WORK = WORK_ROOT / "balancer"
PATH = "/v1/chat/completions"


def _gunicorn_balancer(home: Path, port: int, upstream_port: int, workers: int,
                       reuseport: bool) -> tuple[Proc, str]:
    import requests

    keys = proxybench.make_keys(home, None)
    env = clean_env(LLMLB_HOME=str(home), LLMLB_ROLE="balancer", LLMLB_PORT=str(port),
                    LLMLB_WORKERS=str(workers), LLMLB_LOG_LEVEL="WARNING",
                    HF_ENDPOINT="http://127.0.0.1:9", BENCH_PIN="1",
                    BENCH_REUSEPORT=str(int(reuseport)),
                    BENCH_MASTER_SOCKET=str(home / "master.sock"))
    proc = start_server([str(VENV_BIN / "gunicorn"), "-c", "bench/gunicorn_scale.py",
                         "wsgi:app"], env, WORK / f"scale-{workers}-{int(reuseport)}.log", port,
                        name="balancer")
    r = requests.post(f"http://127.0.0.1:{port}/v0/endpoints", timeout=30,
                      headers={"Authorization": f"Bearer {keys['admin']}"},
                      json={"name": "up", "base_url": f"http://127.0.0.1:{upstream_port}/v1"})
    r.raise_for_status()
    return proc, keys["api"]


def _cpu(pids: list[int]) -> list[float]:
    return [sum(proc_stat(p)[2:4]) / os.sysconf("SC_CLK_TCK") for p in pids]


def part_scale(seconds: float, connections: int = 64) -> dict:
    json_port, sse_port = free_port(), free_port()
    upstream = proxybench.start_upstream_nginx(json_port, sse_port, WORK, core=None)
    out: dict = {"connections": connections}
    try:
        for name, workers, reuseport in (("1 worker", 1, False),
                                         ("2 workers, gunicorn's shared accept", 2, False),
                                         ("2 workers, SO_REUSEPORT per worker", 2, True)):
            port = free_port()
            lb, api = _gunicorn_balancer(WORK / f"scale-home-{workers}-{int(reuseport)}", port,
                                         json_port, workers, reuseport)
            try:
                url = f"http://127.0.0.1:{port}{PATH}"
                proxybench.wrk(url, connections, 2, api, WORK, core=None)  # warm up
                pids = lb.children()
                before = _cpu(pids)
                result = proxybench.wrk(url, connections, seconds, api, WORK, core=None)
                used = [a - b for a, b in zip(_cpu(pids), before, strict=True)]
            finally:
                lb.stop()
            share = [round(u / max(sum(used), 1e-9), 2) for u in used]
            out[name] = {**result, "worker_cpu_s": [round(u, 2) for u in used],
                         "worker_cpu_share": share}
            print(f"  {name:38s} {result['rps']:>8} req/s, p99 {result['p99_us'] / 1000:.1f} "
                  f"ms, errors {result['errors']}, CPU per worker {share}", flush=True)
    finally:
        upstream.stop()
    one = out["1 worker"]["rps"]
    for name in list(out):
        if isinstance(out[name], dict):
            out[name]["vs_1_worker"] = round(out[name]["rps"] / one, 2)
    return out


def scale_table(scale: dict) -> str:
    lines = [f"| {scale['connections']} connections | req/s | × 1 worker | p99 | errors | "
             "CPU share per worker |", "|---|---|---|---|---|---|"]
    for name, r in scale.items():
        if isinstance(r, dict):
            lines.append(f"| {name} | {r['rps']:,.0f} | {r['vs_1_worker']:.2f} | "
                         f"{proxybench._us(r['p99_us'])} | {r['errors']} | "
                         f"{' / '.join(f'{s:.0%}' for s in r['worker_cpu_share'])} |")
    return "\n".join(lines)

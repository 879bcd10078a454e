"""External endpoints and observability (issue 9's figures).

Parts (``--parts``, all by default):

- ``relay``: ``wrk`` (pinned to core 0) against the minimal upstream of ``bench/upstream.py``
  (core 1), directly and through ``llmlb serve --role balancer`` (gunicorn, 1 gevent worker,
  core 1) with the upstream added as an **endpoint** (``POST /v0/endpoints``), metrics and
  request history on (the defaults). 1 connection: p50/p99 and the p50 added to direct;
  64 connections: requests/s, p99, errors. Goals: <= 1 ms added p50, >= 1,000 req/s on the
  one core, zero errors.
- ``accounting``: CPU per request of what metrics and history add to the path (the request's
  watch with its usage parsing, the prometheus_client multiprocess counters and histograms,
  the history row and its share of the batched insert), in this process, and its ratio to the
  CPU per request the balancer spends in all (1 / the ``relay`` requests/s on its core).
  Aim: under 5 %.
- ``scrape``: ``GET /metrics``'s work (``Metrics.scrape``) after ``--requests`` (100,000)
  requests spread over ``--restarts`` + 1 (51) worker processes, each forked, counting its
  share and exiting, then folded by ``fold_dead_worker`` as gunicorn's ``child_exit`` does;
  and, for comparison, without folding (every dead worker's files left). Aim: under 50 ms.

    .venv/bin/python bench/endpoints.py [--parts relay,accounting,scrape] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from balancer import WORK as BALANCER_WORK
from balancer import WORK_ROOT, pinned, start_upstream, wrk
from common import (
    REPO,
    VENV_BIN,
    announce,
    clean_env,
    free_port,
    machine_info,
    run_facts,
    save_summary,
    start_server,
)
from cpuwatch import cpu_busy, wait_quiet

sys.path.insert(0, str(REPO))
WORK = WORK_ROOT / "endpoints"
PATH = "/v1/chat/completions"


def start_balancer_with_endpoint(home: Path, port: int, upstream_port: int, log: Path,
                                 core: int | None, **env: str):  # noqa: ANN201 - (Proc, key)
    import requests

    from llmlb.auth import create_api_key
    from llmlb.state import open_database

    shutil.rmtree(home, ignore_errors=True)
    db = open_database(home / "llmlb.db")
    api, _ = create_api_key(db, "bench", "api")
    admin, _ = create_api_key(db, "bench-admin", "admin")
    db.close()
    args = [str(VENV_BIN / "llmlb"), "serve", "--role", "balancer", "--port", str(port)]
    proc = start_server(pinned(core, args) if core is not None else args, clean_env(
        LLMLB_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", LLMLB_LOG_LEVEL="WARNING",
        **env), log, port, name="balancer")
    r = requests.post(f"http://127.0.0.1:{port}/v0/endpoints", timeout=10,
                      headers={"Authorization": f"Bearer {admin}"},
                      json={"name": "up", "base_url": f"http://127.0.0.1:{upstream_port}/v1"})
    r.raise_for_status()
    return proc, api


def part_relay(seconds: float) -> dict:
    up_port, lb_port = free_port(), free_port()
    upstream = start_upstream(up_port, WORK / "upstream.log", core=1)
    procs = [upstream]
    try:
        lb, api = start_balancer_with_endpoint(WORK / "lb-home", lb_port, up_port,
                                               WORK / "lb.log", core=1)
        procs.append(lb)
        results = {}
        for name, base, key in (("direct", f"http://127.0.0.1:{up_port}", None),
                                ("llmlb-endpoint", f"http://127.0.0.1:{lb_port}", api)):
            wrk(base + PATH, 8, 2, key)  # warm up
            results[name] = {"c1": wrk(base + PATH, 1, seconds, key),
                             "c64": wrk(base + PATH, 64, seconds, key)}
            c1, c64 = results[name]["c1"], results[name]["c64"]
            print(f"  {name:15s} 1 conn: p50 {c1['p50_us']} us, p99 {c1['p99_us']} us | "
                  f"64 conns: {c64['rps']} req/s, p99 {c64['p99_us'] / 1000:.1f} ms, "
                  f"errors {c64['non2xx'] + c64['socket_errors']}", flush=True)
        results["added_p50_us"] = (results["llmlb-endpoint"]["c1"]["p50_us"]
                                   - results["direct"]["c1"]["p50_us"])
        print(f"  added p50: {results['added_p50_us']} us", flush=True)
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()


def _outcome(i: int, pid: int = 0):  # noqa: ANN202 - a RequestRecord
    from llmlb.history import RequestRecord

    return RequestRecord(time.time(), "bench", "chat", f"model-{i % 5}", f"node-{i % 3}",
                         200 if i % 50 else 503, False, 0.012, 0.012, 9, 3, None)


def part_accounting(n: int, relay_rps: float | None) -> dict:
    from llmlb.balancer.accounting import Watch
    from llmlb.balancer.upstream import json_response
    from llmlb.history import History
    from llmlb.metrics import Metrics
    from llmlb.roles import observer
    from llmlb.state import open_database

    tmp = Path(tempfile.mkdtemp(prefix="llmlb-bench-accounting-"))
    try:
        metrics = Metrics(tmp / "metrics", lambda: [])
        history = History(open_database(tmp / "llmlb.db"), 7)
        done = observer(metrics, history)
        answer = json_response(200, {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there!"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
        for _ in range(2000):  # warm: label children, files, the writer thread
            Watch("chat", "bench", done).answered("node-0", answer)
        history.flush()
        cpu = time.process_time()
        for _ in range(n):
            watch = Watch("chat", "bench", done)
            watch.model = "model-0"
            watch.answered("node-0", answer)
        history.flush()  # the batched insert's share counts too
        per_request = (time.process_time() - cpu) / n * 1e6
        history.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"requests": n, "cpu_us_per_request": round(per_request, 1)}
    if relay_rps:
        budget = 1e6 / relay_rps  # the balancer's whole CPU per request on its one core
        out["balancer_cpu_us_per_request"] = round(budget, 1)
        out["share_of_balancer_cpu"] = round(per_request / budget, 3)
    print(f"  metrics + history: {out['cpu_us_per_request']} us CPU per request"
          + (f" = {out['share_of_balancer_cpu']:.1%} of the balancer's "
             f"{out['balancer_cpu_us_per_request']} us" if relay_rps else ""), flush=True)
    return out


def _count_in_child(directory: Path, first: int, count: int) -> int:
    """Fork a worker that counts ``count`` requests and exits; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            from prometheus_client import values

            from llmlb.metrics import Metrics

            values.ValueClass = values.MultiProcessValue()  # this process's own files
            metrics = Metrics(directory, lambda: [])
            for i in range(first, first + count):
                o = _outcome(i)
                metrics.observe(o.model, o.node, o.status, o.latency, o.ttft, o.tokens_in,
                                o.tokens_out)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _time_scrape(metrics, rounds: int = 20) -> tuple[float, float, int]:  # noqa: ANN001
    """Median wall and CPU milliseconds of a scrape (CPU time: what it costs whatever else
    runs on the machine), and its size."""
    times, cpu_times = [], []
    size = 0
    for _ in range(rounds):
        start, cpu = time.perf_counter(), time.process_time()
        data, _ = metrics.scrape()
        times.append((time.perf_counter() - start) * 1000)
        cpu_times.append((time.process_time() - cpu) * 1000)
        size = len(data)
    return statistics.median(times), statistics.median(cpu_times), size


def part_scrape(requests_total: int, restarts: int) -> dict:
    from llmlb.metrics import ENV, Metrics, fold_dead_worker, metric_files, prepare_directory

    out = {}
    for fold in (True, False):
        tmp = Path(tempfile.mkdtemp(prefix="llmlb-bench-scrape-"))
        directory = tmp / "metrics"
        prepare_directory(directory)
        workers = restarts + 1
        share = requests_total // workers
        started = time.perf_counter()
        for w in range(workers):
            pid = _count_in_child(directory, w * share, share)
            if fold and w < workers - 1:  # the last one stands for a live worker
                fold_dead_worker(pid, str(directory))
        counted = time.perf_counter() - started
        os.environ[ENV] = str(directory)
        metrics = Metrics(directory, lambda: [])
        median_ms, cpu_ms, size = _time_scrape(metrics)
        name = "folded" if fold else "not_folded"
        out[name] = {"files": len(metric_files(directory)), "scrape_ms_p50": round(median_ms, 1),
                     "scrape_cpu_ms_p50": round(cpu_ms, 1), "bytes": size,
                     "count_seconds": round(counted, 1)}
        print(f"  {requests_total} requests over {workers} workers, {name}: "
              f"{out[name]['files']} files, scrape {out[name]['scrape_ms_p50']} ms "
              f"({out[name]['scrape_cpu_ms_p50']} ms CPU, {size} bytes)", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out["ratio_not_folded_to_folded"] = round(out["not_folded"]["scrape_ms_p50"]
                                              / out["folded"]["scrape_ms_p50"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="relay,accounting,scrape")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    BALANCER_WORK.mkdir(parents=True, exist_ok=True)  # wrk's script goes there
    started, load_before = announce("endpoints")
    wait_quiet(args.wait_quiet)
    summary: dict = {**run_facts("endpoints", started, load_before, cpu_busy(0.5)),
                     "machine": machine_info()}
    parts = args.parts.split(",")
    rps = None
    if "relay" in parts:
        print("relay to an endpoint (wrk on core 0; upstream and balancer on core 1):",
              flush=True)
        summary["relay"] = part_relay(args.seconds)
        rps = summary["relay"]["llmlb-endpoint"]["c64"]["rps"]
    if "accounting" in parts:
        summary["accounting"] = part_accounting(20_000, rps)
    if "scrape" in parts:
        summary["scrape"] = part_scrape(args.requests, args.restarts)
    save_summary("endpoints", summary, indent=2)


if __name__ == "__main__":
    main()

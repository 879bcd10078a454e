"""What per-key limits cost (issue 19), and how fast usage reads.

- ``proxy``: a balancer (``llmlb serve --role balancer``, gevent, pinned to core 1 with the
  upstream) on each state engine; wrk on core 0 POSTs chat completions with a key that has
  every limit set (rpm, tpm, max concurrent, daily and monthly tokens, a model list; all far
  above what the run sends, so nothing is refused) and with a key without limits, alternated
  in the same run: 1 connection p50 and 64 connections req/s for each.
- ``usage``: ``N`` history rows (default 10 million, a year of traffic: 20 keys, 4 models,
  2 nodes) written through the history's own path (batches of 10,000 rows, each batch's
  roll-ups added in its transaction), then ``GET /v0/usage`` timed through a balancer: the
  default view (last 24 hours, hourly, per model) and the whole year (daily, per key).

    .venv/bin/python bench/limits.py [--parts proxy,usage] [--seconds 10] [--rows 10000000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time

from balancer import start_upstream, wrk
from common import REPO, WORK_ROOT, free_port, machine_info, save_summary
from ha import WORK, balancer, keys, register_upstream

sys.path.insert(0, str(REPO))

LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**13,
          "monthly_tokens": 10**14, "models": ["bench-model"]}


def limited_key(port: int, admin: str) -> str:
    import requests

    r = requests.post(f"http://127.0.0.1:{port}/api/keys", timeout=10,
                      headers={"Authorization": f"Bearer {admin}"},
                      json={"name": "bench-limited", "scopes": ["api"], **LIMITS})
    r.raise_for_status()
    return r.json()["key"]


def part_proxy(pg, seconds: float, rounds: int) -> dict:  # noqa: ANN001 - tests.postgres.Postgres
    up_port = free_port()
    upstream = start_upstream(up_port, WORK / "upstream.log", core=1)
    path = "/v1/chat/completions"
    results: dict[str, dict] = {}
    try:
        for engine in ("sqlite", "postgresql"):
            db_url = pg.new_database() if engine == "postgresql" else None
            shutil.rmtree(WORK / f"limits-{engine}", ignore_errors=True)
            api, node, admin = keys(db_url or WORK / f"limits-{engine}" / "llmlb.db")
            port = free_port()
            lb = balancer(f"limits-{engine}", port, 1, db_url)
            runs: dict[str, dict[str, list]] = {"free": {"c1": [], "c64": []},
                                               "limited": {"c1": [], "c64": []}}
            try:
                register_upstream(port, node, up_port)
                limited = limited_key(port, admin)
                base = f"http://127.0.0.1:{port}{path}"
                for key in (api, limited):
                    wrk(base, 8, 2, key)  # warm: connections, caches, counters
                for _ in range(rounds):
                    for name, key in (("free", api), ("limited", limited)):
                        c1 = wrk(base, 1, seconds, key)
                        c64 = wrk(base, 64, seconds, key)
                        runs[name]["c1"].append(c1["p50_us"])
                        runs[name]["c64"].append(c64["rps"])
                        print(f"  {engine:10s} {name:8s} 1 conn p50 {c1['p50_us']} us | 64 "
                              f"conns {c64['rps']} req/s, errors "
                              f"{c64['non2xx'] + c64['socket_errors']}", flush=True)
            finally:
                lb.stop()
            free, lim = runs["free"], runs["limited"]
            results[engine] = {
                "runs": runs,
                "added_p50_us": statistics.median(lim["c1"]) - statistics.median(free["c1"]),
                "rps_ratio": round(statistics.median(lim["c64"]) / statistics.median(free["c64"]),
                                   3)}
            print(f"  {engine}: limits add {results[engine]['added_p50_us']} us p50, "
                  f"{results[engine]['rps_ratio']}x req/s", flush=True)
    finally:
        upstream.stop()
    return results


def history_rows(n: int, now: float, rng: random.Random):  # noqa: ANN201 - an iterator
    """``n`` requests spread over the year before ``now``, oldest first."""
    span = 365 * 86400
    key_names = [f"key-{i}" for i in range(20)]
    models = ["llama-3.2-1b", "qwen2.5-0.5b", "phi-3-mini", "bge-small"]
    for i in range(n):
        at = now - span + span * i / n
        status = 200 if rng.random() > 0.02 else 500
        latency = rng.lognormvariate(5, 1)
        yield (at, rng.choice(key_names), "chat", rng.choice(models), rng.choice(("a", "b")),
               status, 1, round(latency, 2), round(latency / 4, 2), rng.randint(5, 500),
               rng.randint(1, 300), None if status == 200 else "engine_error")


def part_usage(pg, rows: int) -> dict:  # noqa: ANN001
    import requests

    from llmlb import usage
    from llmlb.state import open_database

    results: dict[str, dict] = {}
    for engine in ("sqlite", "postgresql"):
        db_url = pg.new_database() if engine == "postgresql" else None
        shutil.rmtree(WORK / f"usage-{engine}", ignore_errors=True)
        target = db_url or WORK / f"usage-{engine}" / "llmlb.db"
        _, _, admin = keys(target)
        db = open_database(target)
        started = time.perf_counter()
        batch: list[tuple] = []
        now = time.time()
        for row in history_rows(rows, now, random.Random(1)):
            batch.append(row)
            if len(batch) == 10_000:
                db.requests.insert(batch, usage.rollup(batch))
                batch = []
        if batch:
            db.requests.insert(batch, usage.rollup(batch))
        written = time.perf_counter() - started
        rollups = db.engine.execute("SELECT COUNT(*) AS n FROM usage_hourly").fetchone()["n"]
        db.close()
        port = free_port()
        lb = balancer(f"usage-{engine}", port, None, db_url)
        headers = {"Authorization": f"Bearer {admin}"}
        timings: dict[str, float] = {}
        try:
            for name, params in (("day_hourly_per_model", {"group": "model"}),
                                 ("year_daily_per_key", {"bucket": "day", "group": "key",
                                                         "from": now - 366 * 86400}),
                                 ("year_daily", {"bucket": "day", "from": now - 366 * 86400})):
                samples = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    r = requests.get(f"http://127.0.0.1:{port}/v0/usage", params=params,
                                     headers=headers, timeout=120)
                    samples.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                timings[name] = round(statistics.median(samples), 1)
                total = r.json()["total"]["requests"]
                print(f"  {engine:10s} {name}: {timings[name]} ms (median of 7; "
                      f"{total} requests in range)", flush=True)
        finally:
            lb.stop()
        results[engine] = {"rows": rows, "write_seconds": round(written, 1),
                           "rollup_rows": rollups, "usage_ms": timings}
        print(f"  {engine}: {rows} rows written in {written:.0f} s, {rollups} roll-up rows",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proxy,usage")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    from tests.postgres import Postgres

    WORK.mkdir(parents=True, exist_ok=True)
    (WORK_ROOT / "balancer").mkdir(parents=True, exist_ok=True)  # balancer.wrk's script
    pg = Postgres.start()
    summary: dict = {"machine": machine_info()}
    try:
        if "proxy" in args.parts:
            print("proxy, a key with every limit against one without", flush=True)
            summary["proxy"] = part_proxy(pg, args.seconds, args.rounds)
        if "usage" in args.parts:
            print(f"GET /v0/usage over {args.rows} history rows", flush=True)
            summary["usage"] = part_usage(pg, args.rows)
    finally:
        pg.destroy()
    save_summary("limits", summary, indent=2)


if __name__ == "__main__":
    main()

"""What per-key limits cost (issue 19), and how fast usage reads.

- ``proxy``: a balancer (``llmlb serve --role balancer``, gevent, pinned to core 1 with the
  upstream) on each state engine; wrk on core 0 POSTs chat completions with a key that has
  every limit set (rpm, tpm, max concurrent, daily and monthly tokens, a model list; all far
  above what the run sends, so nothing is refused) and with a key without limits, alternated
  in the same run: 1 connection p50 and 64 connections req/s for each; and a key near one of
  its limits (100 requests at once: every request checked in the state on its own); and the
  balancer's CPU per request at 64 connections (its processes' CPU time over the requests:
  what other processes on a shared machine disturb least).
- ``usage``: the roll-ups ``N`` history rows leave (default 10 million over the last year:
  20 keys, 4 models, 2 nodes; rolled up by ``usage.rollup`` day by day and stored with
  ``COPY``/``executemany``: ``/v0/usage`` never reads the history itself), then
  ``GET /v0/usage`` timed through a balancer, from the page's default view (24 hours,
  hourly, per model) to a whole year per key. The writer's own path (history rows and
  roll-up upserts in one transaction per 10,000) is timed on ``--real-rows`` of them.

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
from ha import WORK, balancer, cpu_seconds, keys, register_upstream

sys.path.insert(0, str(REPO))

LIMITS = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**13,
          "monthly_tokens": 10**14, "models": ["bench-model"]}
# The same but 100 requests at once: with 64 running, a block of slots would be one, so every
# request is checked in the state on its own (and its end written there): what a key near
# one of its limits pays.
NEAR = {**LIMITS, "max_concurrent": 100}


def limited_key(port: int, admin: str, limits: dict | None = None,
                name: str = "bench-limited") -> str:
    import requests

    r = requests.post(f"http://127.0.0.1:{port}/api/keys", timeout=10,
                      headers={"Authorization": f"Bearer {admin}"},
                      json={"name": name, "scopes": ["api"], **(limits or LIMITS)})
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
            runs: dict[str, dict[str, list]] = {name: {"c1": [], "c64": [], "cpu_us": []}
                                               for name in ("free", "limited", "near")}
            try:
                register_upstream(port, node, up_port)
                limited = limited_key(port, admin)
                near = limited_key(port, admin, NEAR, "bench-near")
                base = f"http://127.0.0.1:{port}{path}"
                for key in (api, limited, near):
                    wrk(base, 8, 2, key)  # warm: connections, caches, counters
                for _ in range(rounds):
                    for name, key in (("free", api), ("limited", limited), ("near", near)):
                        c1 = wrk(base, 1, seconds, key)
                        before = cpu_seconds([lb.pid])
                        c64 = wrk(base, 64, seconds, key)
                        cpu = (cpu_seconds([lb.pid]) - before) / max(1, c64["requests"]) * 1e6
                        runs[name]["c1"].append(c1["p50_us"])
                        runs[name]["c64"].append(c64["rps"])
                        runs[name]["cpu_us"].append(round(cpu, 1))
                        print(f"  {engine:10s} {name:8s} 1 conn p50 {c1['p50_us']} us | 64 "
                              f"conns {c64['rps']} req/s, balancer CPU {cpu:.0f} us a request, "
                              f"errors {c64['non2xx'] + c64['socket_errors']}", flush=True)
            finally:
                lb.stop()
            free, lim, near_runs = runs["free"], runs["limited"], runs["near"]
            results[engine] = {
                "runs": runs,
                "added_p50_us": statistics.median(lim["c1"]) - statistics.median(free["c1"]),
                "rps_ratio": round(statistics.median(lim["c64"]) / statistics.median(free["c64"]),
                                   3),
                "near_added_p50_us": (statistics.median(near_runs["c1"])
                                      - statistics.median(free["c1"])),
                "near_rps_ratio": round(statistics.median(near_runs["c64"])
                                        / statistics.median(free["c64"]), 3),
                "added_cpu_us": round(statistics.median(lim["cpu_us"])
                                      - statistics.median(free["cpu_us"]), 1),
                "near_added_cpu_us": round(statistics.median(near_runs["cpu_us"])
                                           - statistics.median(free["cpu_us"]), 1)}
            r = results[engine]
            print(f"  {engine}: far from its limits a key adds {r['added_p50_us']} us p50, "
                  f"{r['rps_ratio']}x req/s, {r['added_cpu_us']} us of CPU; near one (every "
                  f"request checked) {r['near_added_p50_us']} us, {r['near_rps_ratio']}x, "
                  f"{r['near_added_cpu_us']} us of CPU", flush=True)
    finally:
        upstream.stop()
    return results


def day_of_rows(day: int, per_day: int, rng: random.Random) -> list[tuple]:
    """A day's history rows (``REQUEST_COLUMNS`` order): 20 keys, 4 models, 2 nodes."""
    key_names = [f"key-{i}" for i in range(20)]
    models = ["llama-3.2-1b", "qwen2.5-0.5b", "phi-3-mini", "bge-small"]
    rows = []
    for i in range(per_day):
        status = 200 if rng.random() > 0.02 else 500
        latency = rng.lognormvariate(5, 1)
        rows.append((day + 86400 * i / per_day, rng.choice(key_names), "chat",
                     rng.choice(models), rng.choice(("a", "b")), status, 1, round(latency, 2),
                     round(latency / 4, 2), rng.randint(5, 500), rng.randint(1, 300),
                     None if status == 200 else "engine_error"))
    return rows


def part_usage(pg, rows: int, real_rows: int) -> dict:  # noqa: ANN001
    """``rows`` history rows over the last 365 days rolled up by ``usage.rollup`` day by day
    and the roll-ups stored (``COPY`` on PostgreSQL), as the history's writer leaves them;
    the first ``real_rows`` of them also through the writer's own path (history rows and
    roll-up upserts in one transaction per batch of 10,000), to time it."""
    import requests

    from llmlb import usage
    from llmlb.state import open_database
    from llmlb.state.usage import GROUP_COLUMNS, TABLES, by_dimension

    results: dict[str, dict] = {}
    now = time.time()
    first_day = int(now // 86400) * 86400 - 364 * 86400
    per_day = rows // 365
    for engine in ("sqlite", "postgresql"):
        db_url = pg.new_database() if engine == "postgresql" else None
        shutil.rmtree(WORK / f"usage-{engine}", ignore_errors=True)
        target = db_url or WORK / f"usage-{engine}" / "llmlb.db"
        _, _, admin = keys(target)
        db = open_database(target)
        rng = random.Random(1)
        sample = day_of_rows(first_day - 86400, real_rows, rng)
        started = time.perf_counter()
        for i in range(0, len(sample), 10_000):
            batch = sample[i:i + 10_000]
            db.requests.insert(batch, usage.rollup(batch))
        real_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for d in range(365):
            sums = usage.rollup(day_of_rows(first_day + d * 86400, per_day, rng))
            with db.engine.transaction() as tx:
                for span, (table, bucket) in TABLES.items():
                    db.engine.copy_rows(tx, table, (bucket, *GROUP_COLUMNS, *usage.COLUMNS),
                                        sums[span])
                    db.engine.copy_rows(tx, f"{table}_by", ("dim", bucket, "value",
                                                            *usage.COLUMNS),
                                        by_dimension(sums[span]))
        stored = time.perf_counter() - started
        counts = {t: db.engine.execute(f"SELECT COUNT(*) AS n FROM {t}").fetchone()["n"]
                  for t, _ in TABLES.values()}
        db.close()
        port = free_port()
        lb = balancer(f"usage-{engine}", port, None, db_url)
        headers = {"Authorization": f"Bearer {admin}"}
        timings: dict[str, float] = {}
        try:
            for name, params in (
                    ("24h_hourly_per_model", {"group": "model"}),
                    ("24h_hourly_one_key", {"key": "key-3"}),
                    ("7d_hourly_per_key", {"group": "key", "from": now - 7 * 86400}),
                    ("30d_daily_per_model", {"bucket": "day", "group": "model",
                                             "from": now - 30 * 86400}),
                    ("year_daily", {"bucket": "day", "from": now - 366 * 86400}),
                    ("year_daily_per_model", {"bucket": "day", "group": "model",
                                              "from": now - 366 * 86400}),
                    ("year_daily_per_key", {"bucket": "day", "group": "key",
                                            "from": now - 366 * 86400})):
                samples = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    r = requests.get(f"http://127.0.0.1:{port}/v0/usage", params=params,
                                     headers=headers, timeout=120)
                    samples.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                timings[name] = round(statistics.median(samples), 1)
                print(f"  {engine:10s} {name}: {timings[name]} ms (median of 5; "
                      f"{r.json()['total']['requests']} requests, {len(r.json()['data'])} "
                      f"points)", flush=True)
        finally:
            lb.stop()
        results[engine] = {"rows": per_day * 365, "rollup_rows": counts,
                           "rollups_stored_seconds": round(stored, 1),
                           "writer_path_rows_per_second": round(real_rows / real_seconds),
                           "usage_ms": timings}
        print(f"  {engine}: {per_day * 365} rows' roll-ups ({counts}) stored in {stored:.0f} "
              f"s; the writer's path: {real_rows / real_seconds:.0f} rows/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proxy,usage")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--real-rows", type=int, default=50_000)
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
            summary["usage"] = part_usage(pg, args.rows, args.real_rows)
    finally:
        pg.destroy()
    save_summary("limits", summary, indent=2)


if __name__ == "__main__":
    main()

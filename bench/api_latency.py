"""API latency: p50/p90/p99/max of cheap API paths under real gunicorn.

* ``GET /v1/models`` with 100 model directories on disk (each holds a small dummy
  ``model.gguf``; listing never loads a model),
* the ``model_not_found`` path: ``POST /v1/chat/completions`` naming a model that is neither on
  disk nor in the catalog (404),
* ``GET /health`` as the floor: what HTTP, gunicorn, Flask and this Python client cost alone.

The server is ``gunicorn -c gunicorn.conf.py wsgi:app`` with ``LLMLB_WORKERS=2`` and
``LLMLB_DEV=1`` (key ``sk_debug``), ``HF_ENDPOINT`` pointing at a closed local port. Requests
are sequential from one ``requests.Session``: once with keep-alive and once with
``Connection: close`` (a new TCP connection per request); the three paths are interleaved
request by request, after a warm-up. The same paths are then timed in-process (Flask's test
client on ``create_app``, no HTTP) to separate llmlb's own time from the server's and the
client's, with how often a request looks for its model on disk (``Resolver.find``);
``--profile`` adds cProfile's hot spots of that in-process run. Requests are timed in
stretches of 100 rounds; a stretch during which other processes took more than 5% of the cores
is measured again (see ``cpuwatch.py``), so a busy neighbour does not end up in the p99.

Run: ``.venv/bin/python bench/api_latency.py [--requests 2000] [--profile]``. The home
directory lives under ``bench/.work/``; the last line printed is the JSON summary, also saved
as ``bench/.work/results/api_latency-<time>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import requests
from common import (
    AUTH,
    CLOSED_ENDPOINT,
    MISSING_MODEL_CHAT,
    REPO,
    WAIT_QUIET_OTHERS_HELP,
    WORK_ROOT,
    Proc,
    add_quiet_args,
    clean_env,
    free_port,
    gunicorn_cmd,
    llmlb_free_environ,
    machine_info,
    percentile,
    save_summary,
    start_server,
)
from cpuwatch import CpuMonitor, wait_quiet

N_MODELS = 100
TARGET_P99_MS = 10.0


def make_home(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    home = root / "home"
    for i in range(N_MODELS):
        d = home / "models" / f"bench-model-{i:03d}"
        d.mkdir(parents=True)
        (d / "model.gguf").write_bytes(b"GGUF" + bytes(1020))
    return home


def start_gunicorn(home: Path, port: int, workers: int, log: Path) -> Proc:
    env = clean_env(LLMLB_HOME=str(home), LLMLB_PORT=str(port), LLMLB_WORKERS=str(workers),
                    LLMLB_DEV="1", HF_ENDPOINT=CLOSED_ENDPOINT)
    return start_server(gunicorn_cmd(), env, log, port, name="gunicorn")


# --- the paths ----------------------------------------------------------------------------------

def check(path: str, status: int, body: dict) -> None:
    """Every response is checked, so a fast wrong answer cannot pass for a fast right one."""
    if path == "health":
        ok = status == 200
    elif path == "models":
        ok = status == 200 and len(body.get("data", [])) == N_MODELS
    else:
        ok = status == 404 and body.get("error", {}).get("code") == "model_not_found"
    if not ok:
        raise RuntimeError(f"{path}: unexpected answer {status} {str(body)[:300]}")


def http_call(session: requests.Session, base: str, path: str, headers: dict,
              workers: Counter) -> float:
    t0 = time.perf_counter()
    if path == "health":
        r = session.get(f"{base}/health", headers=headers)
    elif path == "models":
        r = session.get(f"{base}/v1/models", headers={**AUTH, **headers})
    else:
        r = session.post(f"{base}/v1/chat/completions", json=MISSING_MODEL_CHAT,
                         headers={**AUTH, **headers})
    body = r.json()
    elapsed = time.perf_counter() - t0
    check(path, r.status_code, body)
    workers[r.headers.get("X-LLMLB-Worker", "?")] += 1
    return elapsed


class Stretches:
    """Measure in stretches of ``size`` rounds (one request per path each); a stretch during
    which other processes used more than ``max_foreign`` of the cores is thrown away and
    measured again (``retries`` times at most, then kept and counted)."""

    def __init__(self, size: int, max_foreign: float, retries: int) -> None:
        self.size, self.max_foreign, self.retries = size, max_foreign, retries
        self.monitor = CpuMonitor()
        self.redone = self.kept_disturbed = 0
        self.foreign_max = 0.0

    def run(self, rounds: int, paths: list[str], call: Callable[[str], float],
            ) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {p: [] for p in paths}
        done = 0
        while done < rounds:
            n = min(self.size, rounds - done)
            for attempt in range(self.retries + 1):
                self.monitor.start()
                got = {p: [] for p in paths}
                for _ in range(n):
                    for p in paths:
                        got[p].append(call(p))
                foreign = self.monitor.foreign()
                if foreign <= self.max_foreign:
                    break
                if attempt == self.retries:
                    self.kept_disturbed += 1
                    print(f"  a stretch stayed disturbed ({foreign:.0%} of the cores used by "
                          "other processes); kept", flush=True)
                    break
                self.redone += 1
                print(f"  stretch disturbed ({foreign:.0%} of the cores used by other "
                      "processes); measuring it again", flush=True)
                wait_quiet(60)
            self.foreign_max = max(self.foreign_max, foreign)
            for p in paths:
                times[p].extend(got[p])
            done += n
        return times


def measure_http(base: str, paths: list[str], n: int, warmup: int, keep_alive: bool,
                 stretches: Stretches) -> tuple[dict[str, list[float]], dict[str, int]]:
    headers = {} if keep_alive else {"Connection": "close"}
    workers: Counter = Counter()
    with requests.Session() as session:
        for _ in range(warmup):
            for p in paths:
                http_call(session, base, p, headers, Counter())
        times = stretches.run(n, paths, lambda p: http_call(session, base, p, headers, workers))
    return times, dict(workers)


def in_process_app(home: Path):  # noqa: ANN201 - a Flask app
    os.environ.clear()
    os.environ.update(llmlb_free_environ())
    from llmlb import create_app
    from llmlb.server import start

    app = create_app({"home": home, "dev": True, "hf_endpoint": CLOSED_ENDPOINT,
                      "log_level": "ERROR"})
    start(app)  # as a gunicorn worker does: its periodic tasks, the history writer
    return app


def in_process_calls(app) -> dict[str, Callable[[], None]]:  # noqa: ANN001
    client = app.test_client()

    def health() -> None:
        r = client.get("/health")
        check("health", r.status_code, r.get_json())

    def models() -> None:
        r = client.get("/v1/models", headers=AUTH)
        check("models", r.status_code, r.get_json())

    def not_found() -> None:
        r = client.post("/v1/chat/completions", json=MISSING_MODEL_CHAT, headers=AUTH)
        check("not_found", r.status_code, r.get_json())

    return {"health": health, "models": models, "not_found": not_found}


def measure_in_process(calls: dict[str, Callable[[], None]], n: int, warmup: int,
                       stretches: Stretches) -> dict[str, list[float]]:
    for _ in range(warmup):
        for call in calls.values():
            call()

    def timed(path: str) -> float:
        t0 = time.perf_counter()
        calls[path]()
        return time.perf_counter() - t0

    return stretches.run(n, list(calls), timed)


def disk_lookups(calls: dict[str, Callable[[], None]], n: int = 100) -> dict[str, float]:
    """How often one in-process request looks for its model on disk (``Resolver.find``, a
    directory walk), counted by cProfile over n requests per path."""
    out = {}
    for path, call in calls.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            call()
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        found = sum(calls_ for (file, _, name), (_, calls_, *_) in stats.items()
                    if name == "find" and file.endswith(os.path.join("resolver", "__init__.py")))
        out[path] = found / n
    return out


def profile(calls: dict[str, Callable[[], None]], n: int, top: int) -> dict[str, str]:
    """cProfile of n in-process requests per path: the functions with most own time, and
    llmlb's functions by cumulative time."""
    out = {}
    for path in ("models", "not_found"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            calls[path]()
        prof.disable()
        own, cumulative = io.StringIO(), io.StringIO()
        stats = pstats.Stats(prof)  # takes the profiler's data: build it once
        stats.stream = cumulative  # type: ignore[attr-defined]
        stats.sort_stats("cumulative").print_stats(
            rf"{re.escape(str(REPO))}/(llmlb|engines)/", top)
        stats.stream = own  # type: ignore[attr-defined]
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        out[path] = (f"=== {path}: {n} in-process requests under cProfile, by own time ===\n"
                     f"{own.getvalue()}"
                     f"=== {path}: llmlb's own functions by cumulative time ===\n"
                     + re.sub(rf"{re.escape(str(REPO))}/", "", cumulative.getvalue()))
    return out


# --- figures ------------------------------------------------------------------------------------

def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": ms[-1], "mean": sum(ms) / len(ms)}


def print_table(title: str, table: dict[str, dict[str, float]], judge: bool) -> None:
    print(title)
    print(f"  {'path':36s} {'n':>5s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s} "
          f"{'mean':>7s}  (ms)")
    labels = {"health": "GET /health (floor)", "models": f"GET /v1/models ({N_MODELS} models)",
              "not_found": "POST /v1/chat/completions -> 404"}
    for path, s in table.items():
        verdict = ""
        if judge and path != "health":
            verdict = f"  p99 < {TARGET_P99_MS:g} ms: {'yes' if s['p99'] < TARGET_P99_MS else 'NO'}"
        print(f"  {labels[path]:36s} {s['n']:5d} {s['p50']:7.2f} {s['p90']:7.2f} "
              f"{s['p99']:7.2f} {s['max']:7.2f} {s['mean']:7.2f}{verdict}")


def machine() -> dict:
    from importlib.metadata import version

    return machine_info(gunicorn=version("gunicorn"), flask=version("flask"),
                        requests=version("requests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per path")
    parser.add_argument("--no-keepalive-requests", type=int, default=1000,
                        help="measured requests per path with a new connection each")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per path")
    parser.add_argument("--workers", type=int, default=2, help="LLMLB_WORKERS")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile hot spots of the in-process requests")
    parser.add_argument("--profile-requests", type=int, default=500)
    add_quiet_args(parser, wait_help=WAIT_QUIET_OTHERS_HELP,
                   foreign_help="a stretch of 100 rounds during which other processes used "
                                "more than this share of the cores is measured again")
    parser.add_argument("--retries", type=int, default=5,
                        help="how often a disturbed stretch is measured again at most")
    args = parser.parse_args()

    info = machine()
    root = WORK_ROOT / "api_latency"
    home = make_home(root)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    paths = ["health", "models", "not_found"]
    stretches = Stretches(100, args.max_foreign, args.retries)
    try:
        server = start_gunicorn(home, port, args.workers, root / "gunicorn.log")
    except RuntimeError as exc:
        if "database is locked" not in str(exc):
            raise
        # Two workers creating a fresh SQLite database at once could lose the race for
        # "PRAGMA journal_mode=WAL" (before llmlb/state/sqlite.py set it up under a file
        # lock, in the master); the database exists now, so try once more.
        print("WARNING: gunicorn failed to boot: a worker got 'database is locked' while "
              "creating the database (first-start race); starting it again", flush=True)
        info["boot_retried"] = True
        server = start_gunicorn(home, port, args.workers, root / "gunicorn-2.log")
    try:
        info["busy_before"] = wait_quiet(args.wait_quiet)
        keep, keep_workers = measure_http(base, paths, args.requests, args.warmup, True,
                                          stretches)
        fresh, fresh_workers = measure_http(base, paths, args.no_keepalive_requests,
                                            args.warmup // 4, False, stretches)
    finally:
        server.stop(timeout=30)
    # In-process, after gunicorn is gone, so nothing else competes for the cores.
    app = in_process_app(home)
    calls = in_process_calls(app)
    inproc = measure_in_process(calls, args.requests, args.warmup, stretches)
    lookups = disk_lookups(calls)
    hot = profile(calls, args.profile_requests, 25) if args.profile else {}
    app.extensions["llmlb"].close()
    info["loadavg_end"] = os.getloadavg()[0]
    info["stretches_measured_again"] = stretches.redone
    info["disturbed_stretches_kept"] = stretches.kept_disturbed
    info["foreign_cpu_max"] = stretches.foreign_max

    results = {
        "keepalive": {p: stats_ms(t) for p, t in keep.items()},
        "no_keepalive": {p: stats_ms(t) for p, t in fresh.items()},
        "in_process": {p: stats_ms(t) for p, t in inproc.items()},
    }
    print(f"llmlb API latency: gunicorn gthread, {args.workers} workers, {N_MODELS} models on "
          f"disk; sequential requests from one client, {args.warmup} warm-up per path")
    print(f"machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, gunicorn "
          f"{info['gunicorn']}, Flask {info['flask']}, requests {info['requests']}; llmlb "
          f"{info['llmlb_commit']}")
    print()
    print_table(f"HTTP, keep-alive (one connection; answered by workers {keep_workers})",
                results["keepalive"], True)
    print_table(f"HTTP, Connection: close (new TCP connection per request; workers "
                f"{fresh_workers})", results["no_keepalive"], True)
    print_table("in-process (Flask test client on create_app: llmlb's own time, no HTTP)",
                results["in_process"], False)
    print("  model lookups on disk (Resolver.find) per request: " + ", ".join(
        f"{path} {n:g}" for path, n in lookups.items()))
    ok = all(results["keepalive"][p]["p99"] < TARGET_P99_MS for p in ("models", "not_found"))
    print(f"\nkeep-alive p99 under {TARGET_P99_MS:g} ms for both paths: {'yes' if ok else 'NO'}; "
          f"other processes: {info['busy_before']:.0%} of the cores busy before, at most "
          f"{stretches.foreign_max:.0%} during a kept stretch; {stretches.redone} stretches "
          f"measured again, {stretches.kept_disturbed} disturbed kept; load average "
          f"{info['loadavg_start']:.2f} -> {info['loadavg_end']:.2f}")
    for text in hot.values():
        print()
        print(text.rstrip())
    summary = {"bench": "api_latency", "models_on_disk": N_MODELS, "workers": args.workers,
               "requests": args.requests, "no_keepalive_requests": args.no_keepalive_requests,
               "warmup": args.warmup, "target_p99_ms": TARGET_P99_MS, "p99_ok": ok,
               "workers_seen": {"keepalive": keep_workers, "no_keepalive": fresh_workers},
               "machine": info, "results": results, "disk_lookups_per_request": lookups}
    save_summary("api_latency", summary, indent=2, separators=(",", ":"))


if __name__ == "__main__":
    main()

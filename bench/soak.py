"""Soak: hours of mixed traffic must not grow llmlb or fail a request (issue: production).

gunicorn as the README runs it (``gunicorn -c gunicorn.conf.py wsgi:app``, ``LLMLB_WORKERS=2``,
32 threads each, ``LLMLB_DEV=1``) with a tiny real GGUF model on disk and a catalog model on
``tests/fake_hub.py`` (a separate process), on loopback. ``--clients`` threads (default 6) each
loop over a weighted mix until the time is up:

* chat completions (non-streaming, 16 tokens) and streams (16 tokens, with usage);
* streams the client abandons after 3 chunks (it closes the connection);
* ``GET /v1/models``, ``GET /api/models`` and a chat for a model that exists nowhere (404);
* a pull of the catalog model (``POST /api/models/register``), then its delete (a 409 while it
  still downloads is an answer, not a failure; the next round deletes it);
* a WebSocket client on ``/ws/models`` that listens for 0.5-2 s and goes.

After ``--warmup`` seconds (default 20: both workers have loaded the model) each worker's RSS
and open file descriptors are read from ``/proc``, and again at the end; the figures: requests
served, answers with status 5xx (goal 0) and transport errors, RSS and fds per worker at start
and end (goal: RSS growth under 10 %, no fd growth), and p50/p99 latency per minute of the
non-streaming requests (goal: flat). A worker that restarted (new pid) is reported.

Run: ``.venv/bin/python bench/soak.py [--minutes 10] [--clients 6] [--warmup 20]``. Work
files live under ``bench/.work/soak/``; the last line printed is the JSON summary, also saved
as ``bench/.work/results/soak-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests
from common import (
    AUTH,
    MISSING_MODEL_CHAT,
    REPO,
    WORK_ROOT,
    announce,
    clean_env,
    free_port,
    gunicorn_cmd,
    hf_quiet_env,
    machine_info,
    percentile,
    run_facts,
    save_summary,
    start_fake_hub,
    start_server,
)

WORK = WORK_ROOT / "soak"
MODEL = "soak-tiny"
PULLED = "soak-pull"
PULL_REPO = "soak/tiny-gguf"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]
MIX = {"chat": 3, "stream": 3, "abandon": 2, "models": 3, "hub": 1, "missing": 1,
       "pull": 1, "websocket": 1}


# --- the setup --------------------------------------------------------------------------------

def build_model() -> Path:
    """The tests' tiny Llama as GGUF, built once under bench/.work/soak."""
    sys.path.insert(0, str(REPO))
    from tests.tinymodels import make_llama_gguf, make_llama_safetensors

    gguf = WORK / "model" / "model.gguf"
    if not gguf.exists():
        st = make_llama_safetensors(WORK / "model-st")
        make_llama_gguf(st, gguf.with_suffix(".tmp"))
        gguf.with_suffix(".tmp").replace(gguf)
    return gguf


def prepare_home(gguf: Path) -> tuple[Path, Path, Path]:
    """A fresh LLMLB_HOME with the model installed, the hub's repo, and a catalog naming it."""
    home, repo_dir = WORK / "home", WORK / "repo"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(repo_dir, ignore_errors=True)
    (home / "models" / MODEL).mkdir(parents=True)
    shutil.copy(gguf, home / "models" / MODEL / "model.gguf")
    repo_dir.mkdir(parents=True)
    shutil.copy(gguf, repo_dir / "model.gguf")
    catalog = WORK / "catalog.json"
    catalog.write_text(json.dumps({"models": [{
        "id": PULLED, "name": "Soak pull", "source": "hf_gguf", "repo_id": PULL_REPO,
        "artifacts": [{"filename": "model.gguf", "size_bytes": gguf.stat().st_size}],
        "required_vram_mb": 64, "tags": ["soak"]}]}))
    return home, repo_dir, catalog


def fd_kinds(pid: int) -> dict[str, int]:
    """A worker's open file descriptors by kind (socket, pipe, ...) or file path: what grew."""
    kinds: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kinds[target.split(":")[0] if ":" in target else target] += 1
    except OSError:
        pass
    return dict(kinds)


def worker_figures(pids: list[int]) -> dict[int, dict[str, int]]:
    """RSS (KiB) and open file descriptors of each worker."""
    out = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = next(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:"))
            kinds = fd_kinds(pid)
            # SQLite keeps one connection (the file and its WAL) per thread that used it, up
            # to LLMLB_THREADS per worker: those grow until every thread has served once.
            db = sum(n for path, n in kinds.items() if path.endswith((".db", ".db-wal")))
            out[pid] = {"rss_kib": rss, "fds": sum(kinds.values()), "fds_not_db": sum(
                kinds.values()) - db}
        except (OSError, StopIteration):
            continue
    return out


# --- the traffic ------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.measuring = False
        self.started = 0.0
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[int, list[float]] = defaultdict(list)  # minute -> seconds
        self.by_kind: dict[str, list[float]] = defaultdict(list)  # every kind, whole run
        self.failures: list[str] = []

    def record(self, kind: str, status: int | None, seconds: float, timed: bool,
               detail: str = "") -> None:
        with self.lock:
            if not self.measuring:
                return
            self.counts[kind] += 1
            if status is None:
                self.errors[kind] += 1
                if len(self.failures) < 20:
                    self.failures.append(f"{kind}: {detail}")
                return
            self.statuses[status] += 1
            self.by_kind[kind].append(seconds)
            if status >= 500 and len(self.failures) < 20:
                self.failures.append(f"{kind}: {status} {detail[:200]}")
            if timed:
                minute = int((time.monotonic() - self.started) // 60)
                self.latency[minute].append(seconds)


def one_request(kind: str, base: str, session: requests.Session) -> tuple[int | None, str]:
    """Send one request of ``kind``; its status (None: no answer) and a detail."""
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 16}
    if kind == "chat":
        r = session.post(f"{base}/v1/chat/completions", json=chat, timeout=120)
        return r.status_code, r.text
    if kind in ("stream", "abandon"):
        body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        with session.post(f"{base}/v1/chat/completions", json=body, stream=True,
                          timeout=120) as r:
            events = 0
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    events += 1
                    if kind == "abandon" and events == 3:
                        return r.status_code, "abandoned"  # closing r closes the socket
                    if line == b"data: [DONE]":
                        return r.status_code, "done"
                    if b'"error"' in line:
                        return 500, line.decode(errors="replace")
            return r.status_code, f"stream ended after {events} events without [DONE]"
    if kind == "models":
        r = session.get(f"{base}/v1/models", timeout=60)
        return r.status_code, r.text
    if kind == "hub":
        r = session.get(f"{base}/api/models", timeout=60)
        return r.status_code, r.text
    if kind == "missing":
        r = session.post(f"{base}/v1/chat/completions", json=MISSING_MODEL_CHAT, timeout=60)
        return r.status_code, r.text
    if kind == "pull":
        r = session.post(f"{base}/api/models/register", json={"model_id": PULLED}, timeout=60)
        if r.status_code >= 500:
            return r.status_code, r.text
        time.sleep(random.uniform(0, 0.5))
        r = session.delete(f"{base}/api/models/{PULLED}", timeout=60)
        return r.status_code, r.text
    if kind == "websocket":
        from websockets.sync.client import connect

        url = base.replace("http://", "ws://") + "/ws/models"
        with connect(url, additional_headers=AUTH, open_timeout=30) as ws:
            end = time.monotonic() + random.uniform(0.5, 2)
            while (left := end - time.monotonic()) > 0:
                try:
                    ws.recv(timeout=left)
                except TimeoutError:
                    break
        return 101, "closed"
    raise ValueError(kind)


def client_loop(base: str, recorder: Recorder, stop: threading.Event, seed: int,
                mix: dict[str, int]) -> None:
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    session = requests.Session()
    session.headers.update(AUTH)
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        started = time.monotonic()
        try:
            status, detail = one_request(kind, base, session)
        except Exception as exc:  # noqa: BLE001 - every failure is a figure
            status, detail = None, f"{type(exc).__name__}: {exc}"
            session = requests.Session()
            session.headers.update(AUTH)
        recorder.record(kind, status, time.monotonic() - started,
                        timed=kind in ("chat", "models", "hub", "missing"), detail=detail)


# --- the run ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated kinds of request to send "
                        f"(default: all of {', '.join(MIX)}), to find which one misbehaves")
    args = parser.parse_args()
    mix = {k: w for k, w in MIX.items() if not args.only or k in args.only.split(",")}

    started, load_before = announce("soak")
    WORK.mkdir(parents=True, exist_ok=True)
    gguf = build_model()
    home, repo_dir, catalog = prepare_home(gguf)
    env = clean_env(**hf_quiet_env(WORK / "hf"))
    hub = start_fake_hub(PULL_REPO, repo_dir, env, WORK / "hub.log", throttle_bps=2_000_000)
    endpoint = hub.first_line(60)
    port = free_port()
    server = start_server(gunicorn_cmd(), {
        **env, "LLMLB_HOME": str(home), "LLMLB_PORT": str(port), "LLMLB_WORKERS": str(args.workers),
        "LLMLB_DEV": "1", "HF_ENDPOINT": endpoint, "LLMLB_SUPPORTED_MODELS": str(catalog),
        "LLMLB_LOG_LEVEL": "WARNING"}, WORK / "server.log", port)
    base = f"http://127.0.0.1:{port}"
    recorder, stop = Recorder(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(base, recorder, stop, i, mix),
                                daemon=True) for i in range(args.clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(args.warmup)
        workers = server.children()
        before = worker_figures(workers)
        for pid in workers:
            print(f"worker {pid} fds at the start: {fd_kinds(pid)}", flush=True)
        with recorder.lock:
            recorder.measuring, recorder.started = True, time.monotonic()
        measured_from = time.monotonic()
        samples: dict[int, dict[int, dict[str, int]]] = {}
        print(f"measuring for {args.minutes:g} min with {args.clients} clients; workers "
              f"{workers}", flush=True)
        while time.monotonic() - measured_from < args.minutes * 60:
            time.sleep(min(10.0, args.minutes * 60 - (time.monotonic() - measured_from)))
            with recorder.lock:
                served = sum(recorder.counts.values())
            now = worker_figures(workers)
            minute = int((time.monotonic() - measured_from - 1e-6) // 60)
            samples[minute] = now  # the last sample of each minute stays
            print(f"  {time.monotonic() - measured_from:6.0f} s: {served} requests; RSS MiB "
                  f"{[round(f['rss_kib'] / 1024, 1) for f in now.values()]}, fds "
                  f"{[f['fds'] for f in now.values()]}", flush=True)
        with recorder.lock:
            recorder.measuring = False
        after = worker_figures(server.children())
        elapsed = time.monotonic() - measured_from
        for pid in server.children():
            print(f"worker {pid} fds at the end: {fd_kinds(pid)}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)
        server.stop()
        hub.stop()

    fivexx = sum(n for s, n in recorder.statuses.items() if s >= 500)
    per_worker = []
    for pid in sorted(set(before) | set(after)):
        b, a = before.get(pid), after.get(pid)
        row = {"pid": pid, "rss_start_mib": b and round(b["rss_kib"] / 1024, 1),
               "rss_end_mib": a and round(a["rss_kib"] / 1024, 1),
               "fds_start": b and b["fds"], "fds_end": a and a["fds"],
               "fds_not_db_start": b and b["fds_not_db"], "fds_not_db_end": a and a["fds_not_db"]}
        if a and b:
            row["rss_growth_pct"] = round(100 * (a["rss_kib"] / b["rss_kib"] - 1), 1)
        per_worker.append(row)
    minutes = [{"minute": m + 1, "requests": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                "p99_ms": round(percentile(v, 99) * 1000, 1),
                "rss_mib": [round(f["rss_kib"] / 1024, 1) for f in samples.get(m, {}).values()],
                "fds_not_db": [f["fds_not_db"] for f in samples.get(m, {}).values()]}
               for m, v in sorted(recorder.latency.items()) if v]

    print(f"\nserved {sum(recorder.counts.values())} requests in {elapsed / 60:.1f} min "
          f"({dict(recorder.counts)}); statuses {dict(sorted(recorder.statuses.items()))}; "
          f"5xx: {fivexx}; transport errors: {dict(recorder.errors)}")
    for failure in recorder.failures:
        print(f"  failure: {failure}")
    print("\n| worker | RSS start MiB | RSS end MiB | growth | fds start → end | "
          "of which not SQLite |")
    print("|---|---|---|---|---|---|")
    for row in per_worker:
        print(f"| {row['pid']} | {row['rss_start_mib']} | {row['rss_end_mib']} | "
              f"{row.get('rss_growth_pct', '—')} % | {row['fds_start']} → {row['fds_end']} | "
              f"{row['fds_not_db_start']} → {row['fds_not_db_end']} |")
    kinds = {k: {"n": len(v), "p50_ms": round(percentile(v, 50) * 1000, 1),
                 "p99_ms": round(percentile(v, 99) * 1000, 1),
                 "max_ms": round(max(v) * 1000, 1)} for k, v in sorted(recorder.by_kind.items())}
    print("\n| kind | n | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for k, f in kinds.items():
        print(f"| {k} | {f['n']} | {f['p50_ms']} | {f['p99_ms']} | {f['max_ms']} |")
    print("\n| minute | requests timed | p50 ms | p99 ms | RSS MiB per worker at its end | "
          "fds not SQLite |")
    print("|---|---|---|---|---|---|")
    for m in minutes:
        print(f"| {m['minute']} | {m['requests']} | {m['p50_ms']} | {m['p99_ms']} | "
              f"{' / '.join(map(str, m['rss_mib']))} | "
              f"{' / '.join(map(str, m['fds_not_db']))} |")
    summary = {**run_facts("soak", started, load_before, 0.0), **machine_info(),
               "minutes": args.minutes, "clients": args.clients,
               "requests": dict(recorder.counts), "statuses": dict(recorder.statuses),
               "fivexx": fivexx, "transport_errors": dict(recorder.errors),
               "failures": recorder.failures, "workers": per_worker, "per_minute": minutes, "per_kind": kinds}
    save_summary("soak", summary, indent=2)


if __name__ == "__main__":
    main()

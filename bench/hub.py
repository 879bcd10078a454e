"""Model hub latencies under gunicorn: the catalog listing while Hugging Face is unreachable,
and the delay from a download's progress to its WebSocket event.

(a) ``GET /api/models`` with a catalog of 200 models (distinct repo ids, none downloaded, so
every listing finds the Hugging Face stats stale and asks a background thread to fetch them)
while the hub cannot be reached, in three variants:

* ``closed``: ``HF_ENDPOINT=http://127.0.0.1:9``, a closed port (connection refused at once),
* ``blackhole``: a local socket server that accepts connections and never answers, with the
  default ``LLMLB_HUB_TIMEOUT_SECONDS`` (2 s),
* ``blackhole_hung``: the same with ``LLMLB_HUB_TIMEOUT_SECONDS=120``, so the stats fetch
  hangs for the whole measurement.

Server: ``gunicorn -c gunicorn.conf.py wsgi:app`` with ``LLMLB_WORKERS=2``, ``LLMLB_DEV=1``
(key ``sk_debug``). Client: one keep-alive ``requests.Session`` (so one worker answers); the
first request is timed on its own (it starts the stats fetch), then 50 warm-up and
``--requests`` measured ones, in stretches of 100 that are measured again when other processes
took more than ``--max-foreign`` of the cores (see ``cpuwatch.py``). Every response must list the
200 models as Available with ``hf_stats: null``. For the blackholes, the share of measured
requests that ran while a stats connection was open (the fetch in flight) is reported.

(b) The delay from a progress step to its ``ModelStatusChanged`` event: a 20 MB file on
``tests/fake_hub.py`` (separate process, ``--throttle-bps 2000000``: ~10 s) is pulled with
``POST /api/models/register`` while a ``websockets`` client listens on ``/ws/models``. A thread
reads the progress record ``<LLMLB_HOME>/models/.locks/<id>.progress.json`` every 2 ms; an
event's delay is its arrival (wall clock) minus the record's ``updated_at`` (written by llmlb
at each update) for the first record showing that percentage, computed as llmlb does
(``int(round(fraction, 4) * 100)``). Runs: ``LLMLB_WORKERS=1``, then ``LLMLB_WORKERS=2`` twice:
the register request sent on a connection held by the other worker than the WebSocket's
(``cross``: that worker's watcher sees the record by polling every 0.2 s) and by the same one
(``same``: the download pokes the watcher). Which worker holds a connection is read from
``/proc`` (the socket's inode in the worker's file descriptors); the downloading worker is the
record's ``pid``.

Run: ``.venv/bin/python bench/hub.py [--requests 500] [--ws-mb 20] [--throttle-bps 2000000]
[--skip-listing] [--skip-ws] [--wait-quiet 120] [--max-foreign 0.05]``.
Everything lives under ``bench/.work/hub/``; the last line printed is the JSON summary, also saved
as ``bench/.work/results/hub-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import select
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests
from common import (
    AUTH,
    CLOSED_ENDPOINT,
    REPO,
    WORK_ROOT,
    Proc,
    add_quiet_args,
    announce,
    clean_env,
    free_port,
    gunicorn_cmd,
    hf_quiet_env,
    measure_in_stretches,
    percentile,
    run_facts,
    save_summary,
    start_fake_hub,
    write_one_model_catalog,
    write_random_file,
)
from cpuwatch import wait_quiet
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

sys.path.insert(0, str(REPO))  # tests.fake_hub from this checkout

WORK = WORK_ROOT / "hub"
N_CATALOG = 200
WS_REPO = "bench-org/ws-progress"
WS_FILE = "model.gguf"
WS_MODEL = "bench-ws-progress"


# --- helpers ----------------------------------------------------------------------------------

def hub_env(**extra: str) -> dict[str, str]:
    """The environment of the processes this benchmark starts: ``clean_env`` (by name: this
    process never imports llmlb) with huggingface_hub quiet and its caches under ``WORK``."""
    return clean_env(from_options=False, **hf_quiet_env(WORK / "hf-home"), **extra)


def server_pid(client_port: int, server_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of the loopback connection from client_port."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote = parts[1], parts[2]
                if (int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port):
                    inode = parts[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


def connection_to(port: int, pids: list[int], want: int | None,
                  tries: int = 200) -> tuple[http.client.HTTPConnection, int]:
    """A keep-alive connection served by worker ``want`` (any worker if None)."""
    for _ in range(tries):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        conn.getresponse().read()  # answered, so some worker has accepted it
        pid = server_pid(conn.sock.getsockname()[1], port, pids)
        if pid is not None and want in (None, pid):
            return conn, pid
        conn.close()
    raise RuntimeError(f"no connection reached worker {want} in {tries} tries")


class Server:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with a fresh LLMLB_HOME."""

    def __init__(self, name: str, workers: int, catalog: Path, endpoint: str,
                 **env: str) -> None:
        self.home = WORK / f"home-{name}"
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(gunicorn_cmd(),
                         hub_env(LLMLB_HOME=str(self.home), LLMLB_PORT=str(self.port),
                                 LLMLB_WORKERS=str(workers), LLMLB_DEV="1",
                                 LLMLB_SUPPORTED_MODELS=str(catalog), HF_ENDPOINT=endpoint,
                                 **env),
                         WORK / f"gunicorn-{name}.log")
        deadline = time.monotonic() + 90
        self.workers: list[int] = []
        while len(self.workers) < workers:  # every worker answers (each builds its own app)
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"gunicorn did not start:\n{self.proc.log.read_text()}")
            with contextlib.suppress(OSError, http.client.HTTPException, RuntimeError):
                conn, pid = connection_to(self.port, self.proc.children(), None, tries=1)
                conn.close()
                if pid not in self.workers:
                    self.workers.append(pid)
            time.sleep(0.05)
        self.workers.sort()

    def stop(self) -> None:
        self.proc.stop()


class Blackhole:
    """Accepts connections and never answers; records when each opened and closed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conns: dict[socket.socket, int] = {}
        while not self._stop.is_set():
            readable, _, _ = select.select([self.sock, *conns], [], [], 0.05)
            for s in readable:
                if s is self.sock:
                    conn, _ = self.sock.accept()
                    conns[conn] = len(self.opened)
                    self.opened[conns[conn]] = time.time()
                    continue
                try:
                    data = s.recv(65536)  # read the request, never answer it
                except OSError:
                    data = b""
                if not data:
                    self.closed[conns.pop(s)] = time.time()
                    s.close()
        for s in conns:
            s.close()
        self.sock.close()

    def in_flight(self, at: float) -> bool:
        return any(t0 <= at and self.closed.get(i, float("inf")) > at
                   for i, t0 in self.opened.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- (a) the listing --------------------------------------------------------------------------

def write_big_catalog(path: Path) -> None:
    models = [{"id": f"bench-model-{i:03d}", "name": f"Bench model {i}", "source": "hf_gguf",
               "repo_id": f"bench-org/model-{i:03d}", "required_vram_mb": 1024,
               "description": "A catalog entry for the listing benchmark.",
               "tags": ["bench", "chat"], "capabilities": ["TextGeneration"],
               "quantization": "Q4_K_M",
               "artifacts": [{"filename": f"model-{i:03d}.Q4_K_M.gguf",
                              "size_bytes": 500_000_000 + i}]} for i in range(N_CATALOG)]
    path.write_text(json.dumps({"models": models}))


def listing_variant(name: str, catalog: Path, n: int, max_foreign: float) -> dict:
    hole = Blackhole() if name.startswith("blackhole") else None
    endpoint = hole.endpoint if hole else CLOSED_ENDPOINT
    extra = {"LLMLB_HUB_TIMEOUT_SECONDS": "120"} if name == "blackhole_hung" else {}
    server = Server(f"list-{name}", 2, catalog, endpoint, **extra)
    session = requests.Session()
    session.trust_env = False
    url = f"{server.url}/api/models"
    bad: list[str] = []

    def one() -> tuple[float, float]:
        t_wall = time.time()
        t0 = time.perf_counter()
        r = session.get(url, headers=AUTH, timeout=60)
        dt = time.perf_counter() - t0
        items = r.json()["models"] if r.status_code == 200 else []
        if (len(items) != N_CATALOG or any(m["hf_stats"] is not None for m in items)
                or any(m["status"] != "Available" for m in items)):
            bad.append(f"{r.status_code}: {r.text[:200]}")
        return dt, t_wall

    try:
        first_ms = one()[0] * 1000
        for _ in range(50):
            one()
        measured = measure_in_stretches(one, n, max_foreign, name_culprits=True)
        samples = measured.samples
    finally:
        server.stop()
        if hole:
            hole.stop()
    ms = [s * 1000 for s, _ in samples]
    result = {"variant": name, "endpoint": endpoint, "workers": 2, "first_ms": round(first_ms, 2),
              "n": len(ms), "p50_ms": round(percentile(ms, 50), 2),
              "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms), 2),
              "mean_ms": round(statistics.fmean(ms), 2), "bad_responses": len(bad),
              "hf_stats_all_null": not bad, "stretches_redone": measured.redone,
              "stretches_disturbed": measured.disturbed, "disturbed_by": measured.culprits}
    if hole:
        result["stats_connections"] = len(hole.opened)
        result["measured_while_fetch_in_flight"] = sum(hole.in_flight(t) for _, t in samples)
        result["stats_connection_seconds"] = [
            round(hole.closed.get(i, time.time()) - t0, 2) for i, t0 in hole.opened.items()]
    if bad:
        print(f"    BAD responses ({len(bad)}), first: {bad[0]}")
    return result


# --- (b) WebSocket progress events ------------------------------------------------------------

def event_pct(fraction: float) -> int:
    """The whole percent llmlb's events report for a record's fraction (hub.snapshot)."""
    return int(round(fraction, 4) * 100)


def ws_run(server: Server, progress_file: Path, placement: str) -> dict:
    with connect(server.url.replace("http://", "ws://") + "/ws/models", proxy=None) as ws:
        return _ws_run(ws, server, progress_file, placement)


def _ws_run(ws, server: Server, progress_file: Path, placement: str) -> dict:  # noqa: ANN001
    ws_pid = server_pid(ws.local_address[1], server.port, server.workers)
    others = [p for p in server.workers if p != ws_pid]
    want = others[0] if placement == "cross" else ws_pid
    conn, post_pid = connection_to(server.port, server.workers, want)

    events: list[tuple[float, dict]] = []
    records: list[tuple[float, dict]] = []
    stop = threading.Event()
    ready = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                message = ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            now = time.time()
            event = json.loads(message)
            events.append((now, event))
            if event.get("model_id") == WS_MODEL and event.get("status") == "Ready":
                ready.set()

    def watch() -> None:
        last = None
        while not stop.is_set():
            try:
                text = progress_file.read_text()
            except OSError:
                text = None
            if text and text != last:
                with contextlib.suppress(ValueError):
                    records.append((time.time(), json.loads(text)))
                last = text
            time.sleep(0.002)

    threads = [threading.Thread(target=receive, daemon=True),
               threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the worker's watcher takes its first snapshot
    t_post = time.time()
    conn.request("POST", "/api/models/register", body=json.dumps({"model_id": WS_MODEL}),
                 headers={**AUTH, "Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 202:
        raise RuntimeError(f"register: {response.status} {body!r}")
    if not ready.wait(300):
        raise RuntimeError("the model never became Ready")
    t_ready = time.time()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(5)
    conn.close()  # (idle for the download: gunicorn's keep-alive has closed it by now)
    r = requests.delete(f"{server.url}/api/models/{WS_MODEL}", headers=AUTH, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"delete: {r.status_code} {r.text}")
    time.sleep(0.5)  # the watchers report the deletion before the next run subscribes

    first_by_pct: dict[int, tuple[float, float]] = {}  # pct -> (updated_at, seen by watcher)
    download_pids = set()
    for seen, rec in records:
        if rec.get("status") != "downloading" or not rec.get("total_bytes"):
            continue
        download_pids.add(rec.get("pid"))
        fraction = min(1.0, rec["downloaded_bytes"] / rec["total_bytes"])
        first_by_pct.setdefault(event_pct(fraction), (rec["updated_at"], seen))
    mine = [(t, e) for t, e in events if e.get("model_id") == WS_MODEL]
    progress_events = [(t, e) for t, e in mine if "progress" in e]
    delays, watcher_delays, unmatched = [], [], []
    for t, e in progress_events:
        pct = round(e["progress"] * 100)
        if pct not in first_by_pct:
            unmatched.append(pct)
            continue
        updated_at, seen = first_by_pct[pct]
        delays.append((t - updated_at) * 1000)
        watcher_delays.append((t - seen) * 1000)
    reported = {round(e["progress"] * 100) for _, e in progress_events}
    skipped = sorted(set(first_by_pct) - reported)
    download_pid = download_pids.pop() if len(download_pids) == 1 else None
    result = {
        "workers": len(server.workers), "placement": placement, "ws_worker": ws_pid,
        "register_worker": post_pid, "download_worker": download_pid,
        "download_in_ws_worker": download_pid == ws_pid,
        "download_seconds": round(t_ready - t_post, 2),
        "events": len(mine), "progress_events": len(progress_events),
        "statuses": [e["status"] for _, e in mine if "progress" not in e],
        "record_versions": len(records), "record_steps": len(first_by_pct),
        "steps_without_event": len(skipped), "pcts_without_event": skipped,
        "events_unmatched": len(unmatched),
    }
    if delays:
        result |= {"delay_median_ms": round(statistics.median(delays), 1),
                   "delay_p95_ms": round(percentile(delays, 95), 1),
                   "delay_max_ms": round(max(delays), 1),
                   "delay_min_ms": round(min(delays), 1),
                   "watcher_delay_median_ms": round(statistics.median(watcher_delays), 1)}
    return result


def ws_bench(ws_bytes: int, throttle: int) -> list[dict]:
    data_dir = WORK / "ws-repo"
    write_random_file(data_dir / WS_FILE, ws_bytes)
    catalog = WORK / "ws-catalog.json"
    write_one_model_catalog(catalog, WS_MODEL, "WebSocket progress benchmark", WS_REPO, WS_FILE,
                            ws_bytes)
    hub = start_fake_hub(WS_REPO, data_dir, hub_env(), WORK / "fake-hub-ws.log",
                         throttle_bps=throttle)
    results = []
    try:
        endpoint = hub.first_line(timeout=60)
        print(f"fake hub (separate process, {throttle / 1e6:.1f} MB/s): {endpoint}")
        for workers, placements in ((1, ("same",)), (2, ("cross", "same"))):
            server = Server(f"ws-{workers}w", workers, catalog, endpoint)
            progress_file = (server.home / "models" / ".locks"
                             / f"{quote(WS_MODEL, safe='')}.progress.json")
            try:
                for placement in placements:
                    r = ws_run(server, progress_file, placement)
                    results.append(r)
                    where = ("the WebSocket's worker" if r["download_in_ws_worker"]
                             else "the other worker")
                    print(f"  LLMLB_WORKERS={workers} download in {where} "
                          f"(ws {r['ws_worker']}, download {r['download_worker']}): "
                          f"{r['download_seconds']:.1f} s, {r['events']} events "
                          f"({r['progress_events']} with progress, "
                          f"{r['record_steps']} record steps, "
                          f"{r['steps_without_event']} steps without an event: "
                          f"{r['pcts_without_event']} %); delay "
                          f"median {r.get('delay_median_ms', float('nan')):.1f} ms, "
                          f"p95 {r.get('delay_p95_ms', float('nan')):.1f} ms, "
                          f"max {r.get('delay_max_ms', float('nan')):.1f} ms", flush=True)
            finally:
                server.stop()
    finally:
        hub.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


# --- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--ws-mb", type=int, default=20, help="size of the pulled file (MB)")
    parser.add_argument("--throttle-bps", type=int, default=2_000_000)
    add_quiet_args(parser,
                   foreign_help="share of the cores other processes may take during a stretch")
    parser.add_argument("--skip-listing", action="store_true")
    parser.add_argument("--skip-ws", action="store_true")
    args = parser.parse_args()

    started, load_before = announce("hub")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with socket.socket() as s:  # the "closed" variant needs port 9 closed
        if s.connect_ex(("127.0.0.1", 9)) == 0:
            raise SystemExit("something listens on 127.0.0.1:9")
    busy_before = wait_quiet(args.wait_quiet)

    listing: list[dict] = []
    if not args.skip_listing:
        catalog = WORK / "catalog-200.json"
        write_big_catalog(catalog)
        print(f"\n(a) GET /api/models, {N_CATALOG} catalog models, gunicorn 2 workers, "
              f"keep-alive session, {args.requests} requests after 1 + 50:")
        for name in ("closed", "blackhole", "blackhole_hung"):
            r = listing_variant(name, catalog, args.requests, args.max_foreign)
            listing.append(r)
            extra = ""
            if "stats_connections" in r:
                extra = (f"; stats connections {r['stats_connections']} (open "
                         f"{r['stats_connection_seconds']} s), measured requests while a "
                         f"fetch was in flight: {r['measured_while_fetch_in_flight']}")
            print(f"  {name:15s} first {r['first_ms']:7.1f} ms  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:6.2f} ms  hf_stats all null: "
                  f"{r['hf_stats_all_null']}  (stretches redone {r['stretches_redone']}, "
                  f"disturbed {r['stretches_disturbed']}){extra}", flush=True)
            for culprit in r["disturbed_by"]:
                print(f"      a stretch was disturbed by: {culprit}")

    ws_results: list[dict] = []
    if not args.skip_ws:
        print(f"\n(b) progress record -> WebSocket event delay, {args.ws_mb} MB pulled at "
              f"{args.throttle_bps / 1e6:.1f} MB/s:")
        ws_results = ws_bench(args.ws_mb * 1_000_000, args.throttle_bps)
    shutil.rmtree(WORK, ignore_errors=True)

    summary = {
        **run_facts("hub", started, load_before, busy_before),
        "listing": listing, "ws": ws_results,
        "listing_p99_under_50ms": all(r["p99_ms"] < 50 for r in listing) if listing else None,
        "ws_max_delay_under_500ms": (all(r.get("delay_max_ms", 1e9) < 500 for r in ws_results)
                                     if ws_results else None),
    }
    save_summary("hub", summary, indent=1)


if __name__ == "__main__":
    main()

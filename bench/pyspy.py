"""Where a process spends its CPU, by part: ``py-spy record`` (a sampling profiler that reads
another process's stacks from outside, ``pip install py-spy``) into a flame graph (SVG) and
the collapsed stacks, then each sample attributed to the innermost frame that belongs to a
known part of the request path.

Frames of no part (the standard library's json, socket, threading, re…) are passed on the way
up, so their time counts for the part that called them: JSON parsed for the body is body
parsing's, a socket written by the upstream pool is the pool's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# (part, pattern on "function (file:line)"), tried in order on each frame from the leaf up.
PARTS = [
    ("routing (prefixes, least busy)", r"llmlb/balancer/(routing|prefixes)\.py"),
    ("members and registry (who is online)", r"llmlb/balancer/(members|registry|reports)\.py"),
    ("in-flight counters", r"llmlb/balancer/inflight\.py"),
    ("upstream pool and HTTP client (http1, httptools)", r"llmlb/balancer/(http1|upstream)\.py"
     r"|\(httptools/"),
    ("accounting (usage, the request's watch)", r"llmlb/balancer/accounting\.py"),
    ("metrics (prometheus_client)", r"llmlb/metrics\.py|\(prometheus_client/"),
    ("history (request rows)", r"llmlb/history\.py"),
    ("key lookup and auth", r"llmlb/(auth|sessions|logins)\.py|authenticate|principal"),
    ("body parsing and model id", r"llmlb/serving/body\.py|parse_json_object|requested_model"),
    ("proxy (choosing, trying, relaying)", r"llmlb/balancer/proxy\.py"),
    ("llmlb's routes and error handlers", r"llmlb/api/|llmlb/errors\.py|llmlb/__init__\.py"),
    ("logging (access log)", r"logging/__init__\.py|gunicorn/glogging\.py|llmlb/logsafe\.py"
     r"|llmlb/gunicorn_worker\.py"),
    ("Flask and werkzeug dispatch", r"\((flask|werkzeug)/"),
    ("llmlb's HTTP/1.1 loop (fast_http, the gevent worker)",
     r"llmlb/(fast_http|gunicorn_gevent)\.py"),
    ("gunicorn request handling (HTTP parsing, WSGI)", r"\(gunicorn/"),
    # gevent's sockets, select and timeouts pass: their time is their caller's (a send to the
    # upstream is the pool's, writing the answer is gunicorn's).
    ("gevent (its hub and loop, greenlet switches)",
     r"\(gevent/(?!_socketcommon|_socket3|socket\.py|select\.py|timeout\.py)|greenlet"),
]


def available() -> str | None:
    """py-spy's path: beside this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, raw_dir: Path,
           rate: int = 250) -> tuple[Path, Path]:
    """Two recordings of ``pid`` one after the other: a flame graph (``out``.svg, kept) and
    collapsed stacks (in ``raw_dir``: large, and what the breakdown reads)."""
    svg, raw = out.with_suffix(".svg"), raw_dir / (out.name + ".txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for path, fmt in ((svg, "flamegraph"), (raw, "raw")):
        subprocess.run([available() or "py-spy", "record", "--pid", str(pid), "--rate",
                        str(rate), "--duration", str(max(1, round(seconds))),
                        "--format", fmt, "--output", str(path)], check=True,
                       capture_output=True)
    return svg, raw


# Threads that wait, sampled as if busy: gevent's native thread pool polls its task queue
# with a timed lock; not the request path.
WAITING = re.compile(r"_WorkerGreenlet\.run \(gevent/threadpool\.py")


def breakdown(collapsed: Path) -> list[tuple[str, float]]:
    """The share of the request path's samples per part, largest first (the rest:
    "other"); samples of waiting threads left out."""
    compiled = [(name, re.compile(pattern)) for name, pattern in PARTS]
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or WAITING.search(stack):
            continue
        samples = int(n)
        total += samples
        counts[_part(stack.split(";"), compiled)] += samples
    return [(name, n / total) for name, n in counts.most_common()] if total else []


def _part(frames: list[str], compiled: list[tuple[str, re.Pattern]]) -> str:
    for frame in reversed(frames):  # from the leaf up
        for name, pattern in compiled:
            if pattern.search(frame):
                return name
    return "other"


def profile_balancer(work: Path, profiles: Path, seconds: float, code: Path | None = None,
                     name: str = "balancer", as_node: bool = False) -> dict:
    """py-spy on the one worker of a balancer (this checkout, or ``code``'s llmlb) under wrk
    at 64 connections: the flame graph and stacks in ``profiles`` as ``name``-<date>, the
    samples by part."""
    import proxybench
    from common import REPO, free_port

    if not available():
        print("  py-spy is not installed (pip install py-spy): no profile", flush=True)
        return {}
    json_port, sse_port, port = free_port(), free_port(), free_port()
    # The upstream beside wrk: on the balancer's core its time would be sampled as the
    # balancer's, waiting in a send for the core it woke the upstream on.
    upstream = proxybench.start_upstream_nginx(json_port, sse_port, work, core=0)
    try:
        lb, api = proxybench.start_llmlb(work / f"home-profile-{name}", port, json_port,
                                         work / f"profile-{name}.log", 1, code=code,
                                         as_node=as_node)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            proxybench.wrk(url, 8, 2, api, work)
            worker = lb.children()[0]
            wrk = ["wrk", "-t1", "-c64", f"-d{round(2 * seconds + 10)}s", "-s",
                   str(work / "post.lua"), url]
            load = subprocess.Popen(proxybench.pinned(0, wrk), stdout=subprocess.DEVNULL)
            try:
                time.sleep(1)
                stamp = time.strftime("%Y%m%d")
                svg, raw = record(worker, seconds, profiles / f"{name}-{stamp}", work)
            finally:
                load.terminate()
                load.wait()
        finally:
            lb.stop()
    finally:
        upstream.stop()
    parts = breakdown(raw)
    print(f"  flame graph: {svg.relative_to(REPO)}; samples by part:", flush=True)
    for name, share in parts:
        print(f"    {share:6.1%}  {name}", flush=True)
    return {"svg": str(svg.relative_to(REPO)), "collapsed": str(raw),
            "parts": {name: round(share, 4) for name, share in parts}}

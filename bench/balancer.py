"""The balancer's own cost (issues 8 and 20): what it adds in front of an upstream that costs
almost nothing, how it scales over cores, and how many slow streams it holds.

Parts (``--parts``; all but ``profile`` by default):

- ``proxy``: ``wrk`` pinned to core 0 (``taskset``); Debian's nginx answering a fixed
  ``chat.completion`` (and, on a second port, a fixed SSE body) as the upstream, pinned to
  core 1 with the proxy under test (``bench/proxybench.py``). Rows, in one run: the upstream
  direct, nginx as a proxy (keep-alive upstream, 1 worker), ``llmlb serve --role balancer``
  (1 gevent worker, its default; then gthread) with the upstream added as an **endpoint**
  (``POST /v0/endpoints``; metrics and history on, the defaults), then the same three for
  streams (``"stream": true``); and ``bench/bare_proxy.py``, Python and gevent making the same
  system calls as llmlb's fast path and nothing else: the floor under llmlb's own cost. 1
  connection: p50 and requests/s; 64 connections:
  requests/s, p99, errors (non-2xx and socket errors), and llmlb's CPU per request (its
  worker's CPU time over the requests: what other processes disturb least). Goals (issue
  20): <= 0.3 ms added p50, >= 3,000 req/s at 64 connections on one core, p99 <= 30 ms,
  0 errors.
- ``--compare REF[,REF]``: more llmlb rows in the same run, each the llmlb of another commit
  (a ``git worktree`` under ``bench/.work/trees/``, on ``PYTHONPATH``: the same venv), with the
  upstream registered as a **node** (commits before issue 9 have no endpoints), and this
  checkout the same way for a like-for-like row; ``--repeat`` rounds in a rotating order,
  medians. E.g. ``--compare 5d35203,main``.
- ``scale``: 1 worker against 2 workers on the 2 cores (each pinned to its own), with
  gunicorn's shared accept and with a ``SO_REUSEPORT`` socket per worker
  (``bench/gunicorn_scale.py``); wrk and the nginx upstream unpinned (on a 2-core machine
  they take their share from the workers). 64 connections: requests/s, the ratio to 1
  worker (goal >= 1.8), and each worker's share of the CPU (how evenly the accept spread).
- ``profile``: ``py-spy`` (``pip install py-spy``) samples the 1-worker balancer under wrk at
  64 connections (and, with ``--compare``, each commit's, as nodes): a flame graph (SVG) under
  ``bench/profiles/`` and a breakdown of the samples by part (Flask dispatch, the key lookup,
  body parsing, routing, the upstream pool, metrics, history, logging, gevent…).
- ``client``: CPU per round trip to an upstream of urllib3 (the first choice) and of the
  balancer's ``http1`` client (httptools), in this process (``bench/upstream.py``).
- ``wire``: CPU per streamed token of passing the node's SSE bytes through vs re-framing them.
- ``streams``: ``--streams`` (1,000) concurrent slow streams through one balancer
  (``bench/upstream.py``, whose timing is what matters here) with the documented gunicorn
  settings (gevent, LLMLB_WORKERS=2), then gthread (LLMLB_WORKERS=4, LLMLB_THREADS=512),
  each ``--tokens`` chunks ``--token-delay`` s apart; every stream must end with ``[DONE]``.

It ends with a Markdown block ready for ``bench/RESULTS.md`` (the machine, its load, the
commit, the tables) and the JSON summary.

    .venv/bin/python bench/balancer.py [--parts proxy,scale,client,wire,streams,profile]
        [--seconds 10] [--compare 5d35203,main] [--repeat 3] [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import proxybench
import pyspy
from common import (
    REPO,
    WORK_ROOT,
    Proc,
    announce,
    clean_env,
    free_port,
    git_state,
    machine_info,
    percentile,
    proc_stat,
    run_facts,
    save_summary,
)
from cpuwatch import cpu_busy, cpu_model, wait_quiet
from proxybench import BODY, STREAM_BODY, pinned, row, table
from scaling import part_scale, scale_table

WORK = WORK_ROOT / "balancer"
TREES = WORK_ROOT / "trees"
PROFILES = REPO / "bench" / "profiles"
PATH = "/v1/chat/completions"


def wrk(url: str, connections: int, seconds: float, api_key: str | None,
        core: int | None = 0) -> dict:
    """wrk pinned to ``core`` (0; None: unpinned); ``endpoints.py``, ``ha.py`` and
    ``limits.py`` use it too."""
    return proxybench.wrk(url, connections, seconds, api_key, WORK, core=core)


def start_upstream(port: int, log: Path, core: int | None = None, **opts: object) -> Proc:
    """``bench/upstream.py``: a Python upstream, for the parts where its timing matters."""
    args = [sys.executable, str(REPO / "bench" / "upstream.py"), "--port", str(port)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = Proc(pinned(core, args), clean_env(), log, stdout_pipe=True)
    assert proc.first_line(30) == "ready"
    return proc


def start_balancer(home: Path, port: int, upstream_port: int, log: Path, core: int | None,
                   **env: str) -> tuple[Proc, str]:
    """This checkout's balancer with the upstream registered as its node ``up``."""
    return proxybench.start_llmlb(home, port, upstream_port, log, core, as_node=True, **env)


def checkout(ref: str) -> Path:
    """A worktree of ``ref`` under bench/.work/trees (made once), or ``ref`` if it is a path."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, text=True,
                            capture_output=True, check=True).stdout.strip()
    tree = TREES / commit
    if not (tree / "llmlb").is_dir():
        TREES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO,
                       capture_output=True, check=True)
    return tree


def part_proxy(seconds: float, compare: list[str], repeat: int = 1,
               python_upstream: bool = False, compare_as: str = "node",
               anchors_only: bool = False) -> dict:
    json_port, sse_port, nginx_port, nginx_sse_port = (free_port() for _ in range(4))
    procs = [proxybench.start_upstream_nginx(json_port, sse_port, WORK, core=1)]
    rows: list[dict] = []
    streams: list[dict] = []
    nodes: list[dict] = []
    old_harness: list[dict] = []
    try:
        procs.append(proxybench.start_proxy_nginx(nginx_port, json_port, WORK, core=1))
        procs.append(proxybench.start_proxy_nginx(nginx_sse_port, sse_port, WORK, core=1,
                                                  name="proxy-sse"))
        direct = row("upstream direct", f"http://127.0.0.1:{json_port}{PATH}", None, seconds,
                     WORK)
        rows += [direct, row("nginx as proxy", f"http://127.0.0.1:{nginx_port}{PATH}", None,
                             seconds, WORK)]
        bare_port = free_port()
        procs.append(proxybench.start_bare_proxy(bare_port, json_port, WORK, core=1))
        rows.append(row("bare gevent proxy (Python's floor)", f"http://127.0.0.1:{bare_port}"
                        f"{PATH}", None, seconds, WORK, pids=[procs[-1].pid]))
        for label, env in (("llmlb balancer (gevent), upstream as an endpoint", {}),
                           ("llmlb balancer (gthread), upstream as an endpoint",
                            {"LLMLB_WORKER_CLASS": "gthread"}))[:0 if anchors_only else 2]:
            rows.append(_llmlb_row(label, json_port, seconds, None, False, env))
        print("  streams (a fixed SSE body: 3 chunks, usage, [DONE]):", flush=True)
        streams.append(row("upstream direct, stream", f"http://127.0.0.1:{sse_port}{PATH}",
                           None, seconds, WORK, STREAM_BODY))
        streams.append(row("nginx as proxy, stream", f"http://127.0.0.1:{nginx_sse_port}"
                           f"{PATH}", None, seconds, WORK, STREAM_BODY))
        if not anchors_only:
            streams.append(_llmlb_row("llmlb balancer (gevent), stream", sse_port, seconds,
                                      None, False, {}, STREAM_BODY))
        if compare:
            as_ = f"as an {compare_as}" if compare_as == "endpoint" else "as a node"
            sides = [(f"llmlb {git_state()} (this checkout), {as_}", None)]
            sides += [(f"llmlb {ref} ({_commit(tree)}), {as_}", tree)
                      for ref, tree in ((ref, checkout(ref)) for ref in compare)]
            nodes = _rounds(sides, json_port, seconds, repeat, "nginx", compare_as == "node")
            if python_upstream:  # issue 8's harness, for the same commits in the same run
                python_port = free_port()
                procs.append(start_upstream(python_port, WORK / "upstream-python.log", core=1))
                old_harness = _rounds([(label.replace("as a node", "as a node, Python "
                                                      "upstream"), tree)
                                       for label, tree in sides], python_port, seconds, repeat,
                                      "bench/upstream.py")
    finally:
        for proc in reversed(procs):
            proc.stop()
    return {"rows": rows, "streams": streams, "commits": nodes, "python_upstream": old_harness,
            "compare_as": compare_as,
            "table": table(rows, direct), "streams_table": table(streams, streams[0]),
            "commits_table": table(nodes + old_harness, direct) if nodes else None}


def _rounds(sides: list[tuple[str, Path | None]], upstream_port: int, seconds: float,
            repeat: int, upstream: str, as_node: bool = True) -> list[dict]:
    """Each side ``repeat`` times in a rotating order; a row of medians per side."""
    print(f"  commits, the upstream ({upstream}) as a {'node' if as_node else 'endpoint'}, "
          f"{repeat} round(s) in a rotating order:", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label, _ in sides}
    for n in range(repeat):
        for label, tree in sides[n % len(sides):] + sides[:n % len(sides)]:
            runs[label].append(_llmlb_row(label, upstream_port, seconds, tree, as_node, {}))
    return [proxybench.median_row(runs[label]) for label, _ in sides]


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True,
                          capture_output=True, check=True).stdout.strip()


def _llmlb_row(label: str, upstream_port: int, seconds: float, code: Path | None,
               as_node: bool, env: dict[str, str], body: dict | None = None) -> dict:
    port = free_port()
    tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    lb, api = proxybench.start_llmlb(WORK / f"home-{tag}", port, upstream_port,
                                     WORK / f"{tag}.log", 1, code=code, as_node=as_node, **env)
    try:
        return row(label, f"http://127.0.0.1:{port}{PATH}", api, seconds, WORK, body,
                   pids=lb.children())
    finally:
        lb.stop()


def part_client(n: int = 3000) -> dict:
    """CPU per round trip: urllib3 (http.client underneath) vs the balancer's http1."""
    sys.path.insert(0, str(REPO))
    import urllib3

    from llmlb.balancer import http1

    port = free_port()
    upstream = start_upstream(port, WORK / "upstream-client.log")
    body = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=4, retries=False)
    ours = http1.Pool(f"http://127.0.0.1:{port}", maxsize=4, connect_timeout=3,
                      read_timeout=10)

    def with_urllib3() -> bytes:
        r = pool.urlopen("POST", "/v1/chat/completions", body=body, headers=headers,
                         preload_content=False)
        data = r.read()
        r.release_conn()
        return data

    def with_http1() -> bytes:
        return ours.request("POST", "/v1/chat/completions", body, headers).read()

    out = {}
    try:
        for name, call in (("urllib3", with_urllib3), ("http1", with_http1)) * 2:
            for _ in range(200):
                call()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n):
                call()
            out[name] = {"cpu_us": round((time.process_time() - cpu) / n * 1e6, 1),
                         "wall_us": round((time.perf_counter() - wall) / n * 1e6, 1)}
    finally:
        upstream.stop()
    print(f"  CPU per round trip: urllib3 {out['urllib3']['cpu_us']} us, http1 "
          f"{out['http1']['cpu_us']} us", flush=True)
    return out


def part_wire(n: int = 200_000) -> dict:
    """Per streamed token: pass the node's SSE event through, or re-frame it."""
    event = (b'data: {"id":"chatcmpl-0123456789abcdef01234567","object":"chat.completion.chunk",'
             b'"created":1700000000,"model":"bench-model","choices":[{"index":0,"delta":'
             b'{"content":" token"},"logprobs":null,"finish_reason":null}]}\n\n')

    def passthrough() -> bytes:
        return event

    def reframe() -> bytes:
        node = json.loads(event[6:])
        text = node["choices"][0]["delta"]["content"]
        chunk = {"id": node["id"], "object": "chat.completion.chunk", "created": node["created"],
                 "model": node["model"], "choices": [{"index": 0, "delta": {"content": text},
                                                      "logprobs": None, "finish_reason": None}]}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    out = {}
    for name, fn in (("passthrough", passthrough), ("reframe", reframe)):
        start = time.process_time()
        for _ in range(n):
            fn()
        out[f"{name}_us_per_token"] = round((time.process_time() - start) / n * 1e6, 3)
    # 1,000 streams of 50 tokens/s = 50,000 tokens/s through the balancer.
    out["reframe_cores_at_50k_tokens_s"] = round(out["reframe_us_per_token"] * 50_000 / 1e6, 2)
    print(f"  per token: pass-through {out['passthrough_us_per_token']} us, re-framing "
          f"{out['reframe_us_per_token']} us (= {out['reframe_cores_at_50k_tokens_s']} cores "
          "at 1,000 streams x 50 tokens/s)", flush=True)
    return out


async def one_stream(port: int, api_key: str, tokens: int) -> tuple[bool, float, str]:
    body = json.dumps({**BODY, "stream": True}).encode()
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n"
                     b"Authorization: Bearer " + api_key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
        writer.close()
    except OSError as exc:
        return False, time.monotonic() - start, f"socket: {exc}"
    ok = data.startswith(b"HTTP/1.1 200") and data.count(b'"content":"t') == tokens \
        and b"data: [DONE]" in data
    return ok, time.monotonic() - start, "" if ok else data[:200].decode(errors="replace")


def part_streams(streams: int, tokens: int, token_delay: float, worker_class: str,
                 workers: int) -> dict:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    up_port, lb_port = free_port(), free_port()
    settings = {"LLMLB_WORKERS": str(workers)}
    if worker_class == "gthread":
        settings.update(LLMLB_WORKER_CLASS="gthread", LLMLB_THREADS="512")
    upstream = start_upstream(up_port, WORK / f"upstream-streams-{worker_class}.log",
                              tokens=tokens, token_delay=token_delay)
    lb, api = start_balancer(WORK / "lb-streams-home", lb_port, up_port,
                             WORK / f"lb-streams-{worker_class}.log", None, **settings)
    try:
        workers = lb.children()
        before = sum(proc_stat(p)[2] + proc_stat(p)[3] for p in workers)

        async def run() -> list[tuple[bool, float, str]]:
            return await asyncio.gather(*(one_stream(lb_port, api, tokens)
                                          for _ in range(streams)))

        started = time.monotonic()
        results = asyncio.run(run())
        wall = time.monotonic() - started
        cpu = (sum(proc_stat(p)[2] + proc_stat(p)[3] for p in workers) - before) / 100
        rss = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * 4096
                  for p in workers) / 2**20
    finally:
        lb.stop()
        upstream.stop()
    durations = [d for _, d, _ in results]
    errors = [e for ok, _, e in results if not ok]
    out = {"streams": streams, "tokens": tokens, "token_delay_s": token_delay,
           "settings": settings, "errors": len(errors), "first_errors": errors[:3],
           "wall_s": round(wall, 2), "duration_p50_s": round(percentile(durations, 50), 2),
           "duration_max_s": round(max(durations), 2), "balancer_cpu_s": round(cpu, 2),
           "balancer_rss_mb": round(rss, 1)}
    print(f"  {worker_class} {settings}: {streams} streams x {tokens} chunks: "
          f"{len(errors)} errors, duration p50 "
          f"{out['duration_p50_s']} s max {out['duration_max_s']} s (ideal "
          f"{tokens * token_delay:.1f} s), balancer CPU {out['balancer_cpu_s']} s, RSS "
          f"{out['balancer_rss_mb']} MB", flush=True)
    return out


def results_block(summary: dict) -> str:
    """What goes into bench/RESULTS.md: when, where, how loaded, which commit; the tables."""
    facts = (f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}, {os.cpu_count()} cores, load "
             f"average {summary['load_avg_before']} before / {summary['load_avg_after']} "
             f"after, busy share of the cores before {summary['busy_before']:.0%}, commit "
             f"{git_state()}")
    out = [f"**{facts}**", ""]
    proxy = summary.get("proxy")
    if proxy:
        out += ["wrk on core 0; the nginx upstream and the proxy under test on core 1:", "",
                proxy["table"], "", "Streams (a fixed SSE body of 3 chunks, usage, [DONE]):", "",
                proxy["streams_table"], ""]
        if proxy["commits_table"]:
            out += [f"Commits, the upstream registered as a{'n' if proxy.get('compare_as') == 'endpoint' else ''} "
                    f"{proxy.get('compare_as', 'node')}:", "", proxy["commits_table"], ""]
    if summary.get("scale"):
        out += ["Two workers on two cores (wrk and the upstream unpinned):", "",
                scale_table(summary["scale"]), ""]
    profiles = {k: v for k, v in summary.items() if k.startswith("profile") and v}
    if profiles:
        names = list(profiles)
        parts = list(dict.fromkeys(p for v in profiles.values() for p in v["parts"]))
        out += ["py-spy, 1 worker under wrk at 64 connections: share of the samples ("
                + ", ".join(f"{n}: {profiles[n]['svg']}" for n in names) + "):", "",
                "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        out += [f"| {part} | " + " | ".join(f"{profiles[n]['parts'].get(part, 0):.1%}"
                                            for n in names) + " |" for part in parts]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proxy,scale,client,wire,streams")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--compare", default="", metavar="REF[,REF]",
                        help="more llmlb rows: other commits (or checkouts), as nodes")
    parser.add_argument("--compare-as", choices=("node", "endpoint"), default="node",
                        help="how the --compare rows add the upstream")
    parser.add_argument("--anchors-only", action="store_true",
                        help="of the fixed rows only the anchors (upstream direct, nginx): "
                        "for quick --compare rounds")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the --compare rows (medians)")
    parser.add_argument("--python-upstream", action="store_true",
                        help="the --compare rows also against bench/upstream.py (issue 8's "
                        "harness: the upstream's own CPU on the proxy's core)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.5)
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started, load_before = announce("balancer")
    wait_quiet(args.wait_quiet)
    summary: dict = {**run_facts("balancer", started, load_before, cpu_busy(0.5)),
                     "machine": machine_info()}
    parts = args.parts.split(",")
    compare = [r for r in args.compare.split(",") if r]
    if "proxy" in parts:
        print("proxy overhead (wrk on core 0; upstream and proxy on core 1):", flush=True)
        summary["proxy"] = part_proxy(args.seconds, compare, args.repeat,
                                      args.python_upstream, args.compare_as,
                                      args.anchors_only)
    if "scale" in parts:
        print("two workers on two cores (64 connections):", flush=True)
        summary["scale"] = part_scale(args.seconds, rounds=args.repeat)
    if "profile" in parts:
        print("profile (py-spy, 1 worker, wrk at 64 connections):", flush=True)
        summary["profile"] = pyspy.profile_balancer(WORK, PROFILES, args.seconds)
        for ref in compare:  # and each commit compared, as a node, beside this one as a node
            summary[f"profile {ref}"] = pyspy.profile_balancer(
                WORK, PROFILES, args.seconds, checkout(ref), f"balancer-{ref}", as_node=True)
        if compare:
            summary["profile node"] = pyspy.profile_balancer(
                WORK, PROFILES, args.seconds, None, "balancer-node", as_node=True)
    if "client" in parts:
        summary["client"] = part_client()
    if "wire" in parts:
        summary["wire"] = part_wire()
    if "streams" in parts:
        summary["streams"] = {
            "gevent": part_streams(args.streams, args.tokens, args.token_delay, "gevent", 2),
            "gthread": part_streams(args.streams, args.tokens, args.token_delay, "gthread", 4)}
    summary["load_avg_after"] = round(os.getloadavg()[0], 2)
    print("\n--- for bench/RESULTS.md ---\n" + results_block(summary) + "\n---", flush=True)
    save_summary("balancer", summary, indent=2)


if __name__ == "__main__":
    main()

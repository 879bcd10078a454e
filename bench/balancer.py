"""The balancer's own cost (issue 8's figures): what it adds in front of a node, and how many
slow streams it holds.

Parts (``--parts``, all by default):

- ``proxy``: ``wrk`` (Debian's, pinned to core 0 with ``taskset``) against a minimal upstream
  that answers a fixed ``chat.completion`` at once (``bench/upstream.py``, pinned to core 1),
  directly, through nginx (``proxy_pass`` with keep-alive, core 1) and through
  ``llmlb serve --role balancer`` (gunicorn, 1 worker, core 1; gevent, its default, then
  gthread) with the upstream registered as its node. 1 connection: p50/p99 and what the proxy adds to the direct p50; 64 connections:
  requests/s, p99, errors (non-2xx and socket errors). Goals: <= 1 ms added p50, >= 1,000
  req/s at 64 connections, p99 <= 100 ms, zero errors.
- ``client``: CPU per round trip to the upstream of urllib3 (the first choice) and of the
  balancer's ``http1`` client (httptools), in this process.
- ``wire``: CPU per streamed token of passing the node's SSE bytes through vs re-framing them
  (decode the node's event, build the OpenAI chunk, encode it), the choice DESIGN.md asks to
  show with a figure.
- ``streams``: ``--streams`` (1,000) concurrent streams through one balancer with the
  documented gunicorn settings (the default gevent workers, LLMLB_WORKERS=2), then with
  gthread (LLMLB_WORKERS=4, LLMLB_THREADS=512), each ``--tokens`` chunks ``--token-delay`` s
  apart from the upstream; every stream must end with ``[DONE]`` and all its chunks. Reports
  errors, stream durations and the balancer's CPU and memory.

    .venv/bin/python bench/balancer.py [--parts proxy,client,wire,streams] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (
    REPO,
    VENV_BIN,
    WORK_ROOT,
    Proc,
    announce,
    clean_env,
    free_port,
    machine_info,
    percentile,
    proc_stat,
    run_facts,
    save_summary,
    start_server,
)
from cpuwatch import cpu_busy, wait_quiet

WORK = WORK_ROOT / "balancer"
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Hello!"}]}
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n', summary.requests,
    summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def pinned(core: int, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *args]


def start_upstream(port: int, log: Path, core: int | None = None, **opts: object) -> Proc:
    args = [sys.executable, str(REPO / "bench" / "upstream.py"), "--port", str(port)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = Proc(pinned(core, args) if core is not None else args, clean_env(), log,
                stdout_pipe=True)
    assert proc.first_line(30) == "ready"
    return proc


def start_balancer(home: Path, port: int, upstream_port: int, log: Path, core: int | None,
                   **env: str) -> tuple[Proc, str]:
    """``llmlb serve --role balancer`` with the upstream registered as its node ``up``."""
    sys.path.insert(0, str(REPO))
    from llmlb.auth import create_api_key
    from llmlb.state import open_database

    shutil.rmtree(home, ignore_errors=True)
    db = open_database(home / "llmlb.db")
    api, _ = create_api_key(db, "bench", "api")
    node, _ = create_api_key(db, "bench-node", "node")
    db.close()
    args = [str(VENV_BIN / "llmlb"), "serve", "--role", "balancer", "--port", str(port)]
    proc = start_server(pinned(core, args) if core is not None else args, clean_env(
        LLMLB_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", LLMLB_LOG_LEVEL="WARNING",
        LLMLB_NODE_TIMEOUT_SECONDS="86400", **env), log, port, name="balancer")
    import requests

    r = requests.post(f"http://127.0.0.1:{port}/v0/nodes", timeout=10,
                      headers={"Authorization": f"Bearer {node}"},
                      json={"name": "up", "url": f"http://127.0.0.1:{upstream_port}",
                            "secret": "bench-secret-0123456789",
                            "report": {"models": [{"id": "bench-model", "object": "model",
                                                   "created": 0, "owned_by": "local"}]}})
    r.raise_for_status()
    return proc, api


def start_nginx(port: int, upstream_port: int, core: int) -> Proc:
    conf_dir = WORK / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {conf_dir}/nginx.pid; error_log {conf_dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {conf_dir}/body; proxy_temp_path {conf_dir}/proxy;
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                 proxy_set_header Connection ""; proxy_buffering off; }}
  }}
}}
""")
    proc = Proc(pinned(core, [shutil.which("nginx") or "nginx", "-c",
                              str(conf_dir / "nginx.conf"), "-p", str(conf_dir)]),
                clean_env(), WORK / "nginx.log")
    time.sleep(0.5)
    return proc


def wrk(url: str, connections: int, seconds: float, api_key: str | None,
        core: int | None = 0) -> dict:
    """wrk's figures for POSTs of BODY to ``url`` (pinned to ``core``; None: any core)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    script = WORK / "post.lua"
    script.write_text(f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(BODY))}\n"
                      + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                                for k, v in headers.items()) + WRK_DONE)
    args = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s",
            str(script), url]
    out = subprocess.run(pinned(core, args) if core is not None else args,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    result = json.loads(line[4:])
    result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
    return result


def part_proxy(seconds: float) -> dict:
    up_port, nginx_port, lb_port = free_port(), free_port(), free_port()
    upstream = start_upstream(up_port, WORK / "upstream.log", core=1)
    path = "/v1/chat/completions"
    sides: dict[str, tuple[str, str | None]] = {"direct": (f"http://127.0.0.1:{up_port}", None)}
    procs = [upstream]
    try:
        if shutil.which("nginx"):
            procs.append(start_nginx(nginx_port, up_port, core=1))
            sides["nginx"] = (f"http://127.0.0.1:{nginx_port}", None)
        lb, api = start_balancer(WORK / "lb-home", lb_port, up_port, WORK / "lb.log", core=1)
        procs.append(lb)
        sides["llmlb"] = (f"http://127.0.0.1:{lb_port}", api)  # gevent, the balancer's default
        results: dict[str, dict] = {}
        for name, (base, key) in list(sides.items()) + [("llmlb-gthread", ("", ""))]:
            if name == "llmlb-gthread":  # the same balancer with the worker class where models run
                lb.stop()
                lb, key = start_balancer(WORK / "lb-home", lb_port, up_port,
                                         WORK / "lb-gthread.log", core=1,
                                         LLMLB_WORKER_CLASS="gthread")
                procs.append(lb)
                base = f"http://127.0.0.1:{lb_port}"
            wrk(base + path, 8, 2, key)  # warm up: connections, caches, the registry
            results[name] = {"c1": wrk(base + path, 1, seconds, key),
                             "c64": wrk(base + path, 64, seconds, key)}
            c1, c64 = results[name]["c1"], results[name]["c64"]
            print(f"  {name:7s} 1 conn: p50 {c1['p50_us']} us, p99 {c1['p99_us']} us | "
                  f"64 conns: {c64['rps']} req/s, p99 {c64['p99_us'] / 1000:.1f} ms, "
                  f"errors {c64['non2xx'] + c64['socket_errors']}", flush=True)
        direct = results["direct"]["c1"]["p50_us"]
        for name in results:
            results[name]["added_p50_us"] = results[name]["c1"]["p50_us"] - direct
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proxy,client,wire,streams")
    parser.add_argument("--seconds", type=float, default=10)
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
    if "proxy" in parts:
        print("proxy overhead (wrk on core 0; upstream and proxy on core 1):", flush=True)
        summary["proxy"] = part_proxy(args.seconds)
    if "client" in parts:
        summary["client"] = part_client()
    if "wire" in parts:
        summary["wire"] = part_wire()
    if "streams" in parts:
        summary["streams"] = {
            "gevent": part_streams(args.streams, args.tokens, args.token_delay, "gevent", 2),
            "gthread": part_streams(args.streams, args.tokens, args.token_delay, "gthread", 4)}
    save_summary("balancer", summary, indent=2)


if __name__ == "__main__":
    main()

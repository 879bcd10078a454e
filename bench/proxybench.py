"""What a proxy costs, measured from outside (issue 20): an upstream that costs almost nothing
(Debian's nginx answering a fixed body), ``wrk`` as the client, each pinned with ``taskset``,
and the proxy under test between them.

- ``start_upstream_nginx``: one nginx worker with two servers: a fixed ``chat.completion`` JSON
  for ``POST /v1/chat/completions`` (and ``GET /v1/models`` listing ``bench-model``, what the
  balancer asks of an endpoint), and on a second port a fixed SSE body for streams (three
  chunks, a usage chunk, ``[DONE]``).
- ``start_proxy_nginx``: nginx as a reverse proxy in front of it (keep-alive to the upstream,
  no buffering), the reference for what a proxy adds.
- ``start_llmlb``: ``llmlb serve --role balancer`` (from this checkout, or another one put
  first on ``PYTHONPATH``: the same venv) with the upstream added as an endpoint, or
  registered as a node (commits before endpoints existed).
- ``wrk``: one run, parsed from a Lua ``done`` hook (p50/p90/p99/max, requests, errors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from common import REPO, VENV_BIN, Proc, clean_env, start_server

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MODEL = "bench-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
STREAM_BODY = {**BODY, "stream": True}
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}, separators=(",", ":"))


def _sse() -> str:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": MODEL}
    events = [{**base, "choices": [{"index": 0, "delta": {"content": word},
                                    "logprobs": None, "finish_reason": None}]}
              for word in ("Hello", " there", "!")]
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                                    "total_tokens": 12}})
    return "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) \
        + "data: [DONE]\n\n"


SSE = _sse()
MODELS = json.dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]})
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n', summary.requests,
    summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def pinned(core: int | None, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *args] if core is not None else args


def _nginx(name: str, work: Path, servers: str, core: int | None) -> Proc:
    conf_dir = work / name
    conf_dir.mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # else its worker runs as nobody
    (conf_dir / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {conf_dir}/nginx.pid; error_log {conf_dir}/error.log;
{user}
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {conf_dir}/body; proxy_temp_path {conf_dir}/proxy;
  fastcgi_temp_path {conf_dir}/fastcgi; uwsgi_temp_path {conf_dir}/uwsgi;
  scgi_temp_path {conf_dir}/scgi;
  keepalive_requests 1000000;
{textwrap.indent(servers, "  ")}
}}
""")
    proc = Proc(pinned(core, [NGINX, "-c", str(conf_dir / "nginx.conf"), "-p", str(conf_dir)]),
                clean_env(from_options=False), work / f"{name}.log")
    wait_port(int(servers.split("listen 127.0.0.1:", 1)[1].split(";", 1)[0]), proc)
    return proc


def wait_port(port: int, proc: Proc, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"exited with {proc.popen.returncode}:\n{proc.log_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}:\n{proc.log_text()}")


def start_upstream_nginx(json_port: int, sse_port: int, work: Path, core: int | None) -> Proc:
    """The upstream: fixed answers, no work per request beyond HTTP."""
    return _nginx("upstream", work, f"""
server {{
  listen 127.0.0.1:{json_port};
  location = /v1/chat/completions {{ default_type application/json; return 200 '{COMPLETION}'; }}
  location = /v1/models {{ default_type application/json; return 200 '{MODELS}'; }}
  location / {{ default_type application/json; return 404 '{{"error":{{"message":"no"}}}}'; }}
}}
server {{
  listen 127.0.0.1:{sse_port};
  location = /v1/chat/completions {{ default_type text/event-stream; return 200 '{SSE}'; }}
  location = /v1/models {{ default_type application/json; return 200 '{MODELS}'; }}
  location / {{ default_type application/json; return 404 '{{"error":{{"message":"no"}}}}'; }}
}}
""", core)


def start_proxy_nginx(port: int, upstream_port: int, work: Path, core: int | None,
                      name: str = "proxy") -> Proc:
    return _nginx(name, work, f"""
upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
server {{
  listen 127.0.0.1:{port};
  location / {{ proxy_pass http://up; proxy_http_version 1.1;
               proxy_set_header Connection ""; proxy_buffering off; }}
}}
""", core)


def start_bare_proxy(port: int, upstream_port: int, work: Path, core: int | None) -> Proc:
    """``bench/bare_proxy.py``: Python and gevent making the same system calls as llmlb's
    fast path, and nothing else (the floor under llmlb's own cost)."""
    proc = Proc(pinned(core, [sys.executable, str(REPO / "bench" / "bare_proxy.py"), str(port),
                              str(upstream_port)]),
                clean_env(from_options=False), work / "bare-proxy.log")
    wait_port(port, proc)
    return proc


def code_env(code: Path | None) -> dict[str, str]:
    """The environment that runs another checkout's llmlb with this venv."""
    if code is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(code),
                                                      os.environ.get("PYTHONPATH")) if p)}


def make_keys(home: Path, code: Path | None) -> dict[str, str]:
    """api, admin and node keys in a fresh home, made by the llmlb that will serve it (its
    own schema)."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    script = ("import json, sys; from pathlib import Path; from llmlb.auth import "
              "create_api_key\ntry:\n    from llmlb.state import open_database\nexcept ImportError:"
              "  # a commit before the shared state\n    from llmlb.db import Database as "
              "open_database\ndb = open_database(Path(sys.argv[1]));"
              "print(json.dumps({s: create_api_key(db, 'bench-' + s, s)[0] for s in "
              "('api', 'admin', 'node')})); db.close()")
    out = subprocess.run([sys.executable, "-c", script, str(home / "llmlb.db")],
                         env={**os.environ, **code_env(code)}, cwd=code or REPO,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def start_llmlb(home: Path, port: int, upstream_port: int, log: Path, core: int | None, *,
                code: Path | None = None, as_node: bool = False,
                **env: str) -> tuple[Proc, str]:
    """A balancer with the upstream as its one member ``up``; (process, api key)."""
    import requests

    keys = make_keys(home, code)
    args = [str(VENV_BIN / "llmlb"), "serve", "--role", "balancer", "--port", str(port)]
    proc = start_server(pinned(core, args), clean_env(
        LLMLB_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", LLMLB_LOG_LEVEL="WARNING",
        LLMLB_NODE_TIMEOUT_SECONDS="86400", **code_env(code), **env), log, port,
        name="balancer")
    base = f"http://127.0.0.1:{upstream_port}"
    if as_node:
        r = requests.post(f"http://127.0.0.1:{port}/v0/nodes", timeout=30,
                          headers={"Authorization": f"Bearer {keys['node']}"},
                          json={"name": "up", "url": base, "secret": "bench-secret-0123456789",
                                "report": {"models": [{"id": MODEL, "object": "model",
                                                       "created": 0, "owned_by": "local"}]}})
    else:
        r = requests.post(f"http://127.0.0.1:{port}/v0/endpoints", timeout=30,
                          headers={"Authorization": f"Bearer {keys['admin']}"},
                          json={"name": "up", "base_url": f"{base}/v1"})
    if r.status_code >= 300:
        proc.stop()
        raise RuntimeError(f"adding the upstream: {r.status_code} {r.text}")
    return proc, keys["api"]


def wrk(url: str, connections: int, seconds: float, api_key: str | None, work: Path,
        body: dict | None = None, core: int | None = 0) -> dict:
    """One wrk run of POSTs of ``body`` (default: a small chat); wrk pinned to ``core``."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    script = work / "post.lua"
    script.write_text(f"wrk.method = 'POST'\nwrk.body = {json.dumps(json.dumps(body or BODY))}\n"
                      + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                                for k, v in headers.items()) + WRK_DONE)
    done = subprocess.run(pinned(core, ["wrk", "-t1", f"-c{connections}",
                                        f"-d{max(1, round(seconds))}s", "--latency",
                                        "-s", str(script), url]),
                          capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK "))
    result = json.loads(line[4:])
    result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
    result["errors"] = result["non2xx"] + result["socket_errors"]
    return result


def row(name: str, url: str, api_key: str | None, seconds: float, work: Path,
        body: dict | None = None, core: int | None = 0, pids: list[int] | None = None) -> dict:
    """The issue's figures for one side: a warm-up, then 1 and 64 connections; with ``pids``
    (the proxy's processes) also their CPU per request at 64 connections, which other
    processes on a shared machine disturb far less than times."""
    wrk(url, 8, 2, api_key, work, body, core)  # connections, caches, the registry
    c1 = wrk(url, 1, seconds, api_key, work, body, core)
    from common import Monitor

    before = cpu_seconds(pids or [])
    monitor = Monitor()
    monitor.start()
    c64 = wrk(url, 64, seconds, api_key, work, body, core)
    out = {"name": name, "c1": c1, "c64": c64, "others": round(monitor.foreign(), 2)}
    if pids:
        out["cpu_us"] = round((cpu_seconds(pids) - before) / max(1, c64["requests"]) * 1e6, 1)
    print(f"  {name:44s} 1 conn: p50 {c1['p50_us']:>6} us, {c1['rps']:>8} req/s | 64 conns: "
          f"{c64['rps']:>8} req/s, p99 {c64['p99_us'] / 1000:.1f} ms, errors "
          f"{c64['errors'] + c1['errors']} (socket {c64['socket_errors'] + c1['socket_errors']})"
          + (f" | CPU {out['cpu_us']} us/request" if pids else "")
          + f" | other processes {out['others']:.0%}", flush=True)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (their threads included)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def median_row(runs: list[dict]) -> dict:
    """Several runs of one side as one row: the median of each figure, errors summed."""
    def med(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    out = {"name": runs[0]["name"] + (f" (median of {len(runs)})" if len(runs) > 1 else ""),
           "runs": runs}
    for conns in ("c1", "c64"):
        out[conns] = {k: med([r[conns][k] for r in runs])
                      for k in ("p50_us", "p99_us", "rps", "requests")}
        out[conns]["errors"] = sum(r[conns]["errors"] for r in runs)
    if all("cpu_us" in r for r in runs):
        out["cpu_us"] = med([r["cpu_us"] for r in runs])
    return out


def table(rows: list[dict], direct: dict | None) -> str:
    """The rows as the issue's Markdown table (p50 added to ``direct``'s), with the proxy's
    CPU per request where it was measured."""
    cpu = any("cpu_us" in r for r in rows)
    lines = ["| POST /v1/chat/completions | p50 at 1 conn | req/s at 1 | req/s at 64 | "
             "p99 at 64 | errors |" + (" proxy CPU per request at 64 |" if cpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if cpu else "")]
    for r in rows:
        p50 = r["c1"]["p50_us"]
        added = f" (+{_us(p50 - direct['c1']['p50_us'])})" if direct and r is not direct else ""
        lines.append(f"| {r['name']} | {_us(p50)}{added} | {r['c1']['rps']:,.0f} | "
                     f"{r['c64']['rps']:,.0f} | {_us(r['c64']['p99_us'])} | "
                     f"{r['c1']['errors'] + r['c64']['errors']} |"
                     + (f" {_us(r['cpu_us'])} |" if "cpu_us" in r else " |" if cpu else ""))
    return "\n".join(lines)


def _us(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.2f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"

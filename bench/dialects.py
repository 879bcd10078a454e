"""The agent APIs against chat completions (issue 18's figures).

Parts (``--parts``, both by default):

- ``throughput``: tokens/s of one stream through ``/v1/messages`` and ``/v1/responses``
  divided by the same through ``/v1/chat/completions`` (same model, prompt and length; the
  kinds interleaved, ``--reps`` each, medians). Two cases: an llmlb **node** (``llmlb serve``,
  the tiny 16k-context GGUF Llama, ``--tokens`` generated: the node frames each dialect) and
  a **translated endpoint** (``llmlb serve --role balancer`` with ``tests/fake_openai.py``
  added as an endpoint that speaks only chat: the balancer translates each chunk), the fake
  sending ``--fake-tokens`` as fast as it can and, separately, at 200 tokens/s. Aim: >= 0.95.
- ``latency``: p50 of a whole (non-streamed) answer at 1 connection, ``--requests`` each,
  through the balancer to a chat-only endpoint that answers at once (``bench/upstream.py``):
  Messages and Responses (``"store": false``: translation alone; translated both ways on the
  balancer) against chat (passed through). Aim: <= 0.3 ms added at p50.

    .venv/bin/python bench/dialects.py [--parts throughput,latency] [--cases node,endpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

from balancer import start_upstream
from common import (
    AUTH,
    REPO,
    WORK_ROOT,
    announce,
    children_of,
    clean_env,
    free_port,
    llmlb_serve_cmd,
    machine_info,
    percentile,
    proc_stat,
    save_summary,
    start_server,
)

sys.path.insert(0, str(REPO))
WORK = WORK_ROOT / "dialects"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]


def bodies(model: str, tokens: int, stream: bool) -> dict[str, tuple[str, dict]]:
    return {
        "chat": ("/v1/chat/completions", {"model": model, "messages": HELLO, "stream": stream,
                                          "max_tokens": tokens, "temperature": 0,
                                          **({"stream_options": {"include_usage": True}}
                                             if stream else {})}),
        "messages": ("/v1/messages", {"model": model, "messages": HELLO, "stream": stream,
                                      "max_tokens": tokens, "temperature": 0}),
        "responses": ("/v1/responses", {"model": model, "input": HELLO, "stream": stream,
                                        "max_output_tokens": tokens, "temperature": 0}),
    }


def stream_rate(session, url: str, path: str, body: dict) -> tuple[float, int]:  # noqa: ANN001
    """(tokens/s from the first to the last byte, output tokens) of one stream."""
    started = first = None
    last = b""
    with session.post(url + path, json=body, headers=AUTH, stream=True, timeout=600) as r:
        r.raise_for_status()
        started = time.perf_counter()
        for chunk in r.iter_content(chunk_size=None):
            if first is None:
                first = time.perf_counter()
            last = (last + chunk)[-8192:]
        ended = time.perf_counter()
    import re

    found = re.findall(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)', last)
    tokens = int(found[-1]) if found else 0
    return tokens / max(ended - (first or started), 1e-9), tokens


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes and their children (threads included)."""
    total = 0
    for pid in {p for root in pids for p in (root, *children_of(root))}:
        try:
            _, _, user, system = proc_stat(pid)
        except OSError:
            continue
        total += user + system
    return total / os.sysconf("SC_CLK_TCK")


def throughput(url: str, model: str, tokens: int, reps: int, pids: list[int]) -> dict:
    """Tokens/s by the wall clock, and tokens per CPU second of ``pids`` (the llmlb serving
    the streams): on a machine others share, the wall clock says more about them."""
    import requests

    session = requests.Session()
    kinds = bodies(model, tokens, True)
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    per_cpu: dict[str, list[float]] = {k: [] for k in kinds}
    counted: dict[str, int] = {}
    stream_rate(session, url, *kinds["chat"])  # loads the model, warms the path
    for _ in range(reps):
        for kind, (path, body) in kinds.items():
            before = cpu_seconds(pids)
            rate, n = stream_rate(session, url, path, body)
            used = cpu_seconds(pids) - before
            rates[kind].append(rate)
            per_cpu[kind].append(n / max(used, 0.01))
            counted[kind] = n
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in per_cpu.items()}
    return {"tokens": counted, "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "ratio_messages": round(med["messages"] / med["chat"], 3),
            "ratio_responses": round(med["responses"] / med["chat"], 3),
            "tokens_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "cpu_ratio_messages": round(cpu["messages"] / cpu["chat"], 3),
            "cpu_ratio_responses": round(cpu["responses"] / cpu["chat"], 3)}


def latency(url: str, model: str, requests_each: int) -> dict:
    import requests

    session = requests.Session()
    kinds = bodies(model, 5, False)
    kinds["responses"][1]["store"] = False
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(50):  # warm: connections, the translator's first 404s
        for path, body in kinds.values():
            session.post(url + path, json=body, headers=AUTH, timeout=30).raise_for_status()
    for _ in range(requests_each):
        for kind, (path, body) in kinds.items():
            t = time.perf_counter()
            session.post(url + path, json=body, headers=AUTH, timeout=30).raise_for_status()
            times[kind].append((time.perf_counter() - t) * 1000)
    p50 = {k: percentile(v, 50) for k, v in times.items()}
    return {"p50_ms": {k: round(v, 3) for k, v in p50.items()},
            "p99_ms": {k: round(percentile(v, 99), 3) for k, v in times.items()},
            "added_p50_ms": {k: round(p50[k] - p50["chat"], 3) for k in ("messages",
                                                                          "responses")}}


def node_case(args: argparse.Namespace) -> dict:
    from tests.tinymodels import make_llama_gguf, make_llama_safetensors

    home = WORK / "node"
    shutil.rmtree(home, ignore_errors=True)
    st = make_llama_safetensors(WORK / "model-st", max_position_embeddings=16384)
    make_llama_gguf(st, home / "models" / "tiny" / "model.gguf")
    port = free_port()
    proc = start_server([*llmlb_serve_cmd(port)], clean_env(
        LLMLB_HOME=str(home), LLMLB_DEV="1", LLMLB_CONTEXT_LENGTH="4096"),
        WORK / "node.log", port, name="llmlb")
    try:
        return throughput(f"http://127.0.0.1:{port}", "tiny", args.tokens, args.reps,
                          [proc.pid])
    finally:
        proc.stop()


def endpoint_balancer(fake_url: str) -> tuple[object, str]:
    import requests

    home = WORK / "balancer"
    shutil.rmtree(home, ignore_errors=True)
    port = free_port()
    proc = start_server([*llmlb_serve_cmd(port)], clean_env(
        LLMLB_HOME=str(home), LLMLB_DEV="1", LLMLB_ROLE="balancer"), WORK / "balancer.log",
        port, name="balancer")
    url = f"http://127.0.0.1:{port}"
    r = requests.post(f"{url}/v0/endpoints", headers=AUTH, timeout=30,
                      json={"name": "chat-only", "base_url": fake_url})
    r.raise_for_status()
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="throughput,latency")
    parser.add_argument("--cases", default="node,endpoint",
                        help="throughput's cases: an llmlb node, a translated endpoint")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per node stream")
    parser.add_argument("--fake-tokens", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    announce("dialects")
    WORK.mkdir(parents=True, exist_ok=True)
    from tests.fake_openai import FakeOpenAI

    summary: dict = {"bench": "dialects", **machine_info()}
    cases = set(args.cases.split(","))
    if "throughput" in parts and "node" in cases:
        summary["node"] = node_case(args)
        print("node:", json.dumps(summary["node"]))
    fast = FakeOpenAI("chat-only", ("fake-model",), tokens=args.fake_tokens).__enter__()
    paced = FakeOpenAI("paced", ("paced-model",), tokens=400, token_delay=0.005).__enter__()
    proc, url = endpoint_balancer(fast.url)
    try:
        import requests

        requests.post(f"{url}/v0/endpoints", headers=AUTH, timeout=30,
                      json={"name": "paced", "base_url": paced.url}).raise_for_status()
        if "throughput" in parts and "endpoint" in cases:
            summary["endpoint_unthrottled"] = throughput(url, "fake-model", args.fake_tokens,
                                                         args.reps, [proc.pid])
            print("endpoint, as fast as it goes:", json.dumps(summary["endpoint_unthrottled"]))
            summary["endpoint_200_tok_s"] = throughput(url, "paced-model", 400, args.reps,
                                                       [proc.pid])
            print("endpoint, 200 tokens/s:", json.dumps(summary["endpoint_200_tok_s"]))
        if "latency" in parts:
            upstream_port = free_port()
            upstream = start_upstream(upstream_port, WORK / "upstream.log")
            try:
                requests.post(f"{url}/v0/endpoints", headers=AUTH, timeout=30, json={
                    "name": "bench-upstream", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                }).raise_for_status()
                summary["latency"] = latency(url, "bench-model", args.requests)
            finally:
                upstream.stop()
            print("latency:", json.dumps(summary["latency"]))
    finally:
        proc.stop()
        fast.__exit__()
        paced.__exit__()
    save_summary("dialects", summary, indent=2)


if __name__ == "__main__":
    main()

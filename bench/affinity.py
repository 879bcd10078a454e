"""Conversation affinity (issue 8): time to first token of the follow-up turns of multi-turn
conversations over two GGUF nodes, with ``LLMLB_AFFINITY`` on and off.

A balancer (``llmlb serve --role balancer``) and two ``llmlb node`` processes, each with the
~63M-parameter Llama of ``engine_overhead.py`` as GGUF f16. ``--users`` clients run at once;
each runs ``--conversations`` conversations one after the other, ``--turns`` turns each, every
conversation with its own long system prompt (``--prompt-words``). llama.cpp keeps the last
prompt's KV cache, so a follow-up turn that reaches the node which answered the previous one
(and saw nothing else in between) skips evaluating the shared prefix. TTFT: request sent ->
first content chunk (streamed, openai SDK). The same conversations run in both modes.
While they run, ``/v0/nodes`` is sampled every 50 ms: the most requests in flight on one node
is reported with the bound affinity keeps (``ceil(LLMLB_AFFINITY_LOAD_FACTOR x average)``).

    .venv/bin/python bench/affinity.py [--users 2] [--conversations 3] [--turns 5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import threading
import time
from pathlib import Path

from common import (
    REPO,
    VENV_BIN,
    WORK_ROOT,
    announce,
    clean_env,
    free_port,
    machine_info,
    percentile,
    run_facts,
    save_summary,
    start_server,
)
from cpuwatch import cpu_busy, wait_quiet

WORK = WORK_ROOT / "affinity"
MODEL_ID = "bench-gguf"
WORDS = ["river", "mountain", "lantern", "copper", "violet", "harbor", "meadow", "thunder", "quiet", "orbit", "saddle", "pepper", "glacier", "anchor", "velvet", "compass", "ember", "willow", "falcon", "marble", "tide", "cedar"]


def system_prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"You are assistant number {seed}. Background: " + " ".join(
        rng.choice(WORDS) for _ in range(words))


def start_cluster(affinity: bool, model: Path, tag: str) -> tuple[list, str, str]:
    sys.path.insert(0, str(REPO))
    from llmlb.auth import create_api_key
    from llmlb.state import open_database

    home = WORK / f"{tag}-balancer"
    shutil.rmtree(WORK / tag, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    db = open_database(home / "llmlb.db")
    api, _ = create_api_key(db, "bench", "api")
    admin, _ = create_api_key(db, "admin", "admin")
    node_key, _ = create_api_key(db, "nodes", "node")
    db.close()
    port = free_port()
    common = {"HF_ENDPOINT": "http://127.0.0.1:9", "LLMLB_LOG_LEVEL": "WARNING",
              "LLMLB_HEARTBEAT_SECONDS": "1"}
    procs = [start_server([str(VENV_BIN / "llmlb"), "serve", "--role", "balancer", "--port",
                           str(port)],
                          clean_env(LLMLB_HOME=str(home), LLMLB_AFFINITY=str(int(affinity)),
                                    **common), WORK / f"{tag}-balancer.log", port)]
    for name in ("node-a", "node-b"):
        node_home = WORK / tag / name
        (node_home / "models" / MODEL_ID).mkdir(parents=True)
        shutil.copy(model, node_home / "models" / MODEL_ID / "model.gguf")
        node_port = free_port()
        procs.append(start_server(
            [str(VENV_BIN / "llmlb"), "node", "--balancer-url", f"http://127.0.0.1:{port}",
             "--name", name, "--port", str(node_port), "--host", "127.0.0.1"],
            clean_env(LLMLB_HOME=str(node_home), LLMLB_NODE_API_KEY=node_key, **common),
            WORK / f"{tag}-{name}.log", node_port))
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nodes = requests.get(f"http://127.0.0.1:{port}/v0/nodes", timeout=10,
                             headers={"Authorization": f"Bearer {admin}"}).json()["data"]
        if len([n for n in nodes if n["status"] == "online" and MODEL_ID in n["models"]]) == 2:
            return procs, f"http://127.0.0.1:{port}", api + " " + admin
        time.sleep(0.2)
    raise RuntimeError("the nodes did not register")


def run_mode(affinity: bool, model: Path, args: argparse.Namespace) -> dict:
    import openai
    import requests

    tag = "on" if affinity else "off"
    procs, url, keys = start_cluster(affinity, model, tag)
    api, admin = keys.split()
    turns: list[dict] = []
    peak = {"max_node": 0, "max_total": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            data = requests.get(f"{url}/v0/nodes", headers={"Authorization": f"Bearer {admin}"},
                                timeout=10).json()["data"]
            loads = [n["in_flight"] for n in data]
            peak["max_node"] = max(peak["max_node"], *loads)
            peak["max_total"] = max(peak["max_total"], sum(loads))
            stop.wait(0.05)

    def user(u: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api, max_retries=0, timeout=300)
        for k in range(args.conversations):
            seed = 1000 * u + k
            messages = [{"role": "system", "content": system_prompt(seed, args.prompt_words)},
                        {"role": "user", "content": "Hello, who are you?"}]
            previous = None
            for turn in range(1, args.turns + 1):
                sent = time.perf_counter()
                ttft, text = None, ""
                with client.chat.completions.with_streaming_response.create(
                        model=MODEL_ID, messages=messages, max_tokens=args.max_tokens,
                        temperature=0, stream=True) as response:
                    node = response.headers["X-LLMLB-Node"]
                    for chunk in response.parse():
                        if chunk.choices and chunk.choices[0].delta.content:
                            ttft = ttft or time.perf_counter() - sent
                            text += chunk.choices[0].delta.content
                turns.append({"user": u, "conversation": seed, "turn": turn, "node": node,
                              "ttft_ms": round((ttft or 0) * 1000, 1),
                              "same_node": previous == node})
                previous = node
                messages += [{"role": "assistant", "content": text},
                             {"role": "user", "content": f"Tell me more, part {turn + 1}."}]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        threads = [threading.Thread(target=user, args=(u,)) for u in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        for proc in reversed(procs):
            proc.stop()
    follow = [t for t in turns if t["turn"] > 1]
    ttfts = [t["ttft_ms"] for t in follow]
    out = {"affinity": affinity, "turns": len(turns),
           "follow_up_ttft_p50_ms": percentile(ttfts, 50),
           "follow_up_ttft_p90_ms": percentile(ttfts, 90),
           "first_turn_ttft_p50_ms": percentile([t["ttft_ms"] for t in turns
                                                 if t["turn"] == 1], 50),
           "follow_up_same_node": round(sum(t["same_node"] for t in follow) / len(follow), 2),
           "requests_by_node": {n: sum(t["node"] == n for t in turns)
                                for n in ("node-a", "node-b")},
           "max_in_flight_one_node": peak["max_node"], "max_in_flight_total": peak["max_total"],
           "per_turn": turns}
    print(f"  affinity {tag:3s}: follow-up TTFT p50 {out['follow_up_ttft_p50_ms']} ms, p90 "
          f"{out['follow_up_ttft_p90_ms']} ms (first turns {out['first_turn_ttft_p50_ms']} ms); "
          f"same node as the previous turn {out['follow_up_same_node']:.0%}; by node "
          f"{out['requests_by_node']}; most in flight on one node {peak['max_node']} "
          f"(of {peak['max_total']})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=60)  # the model holds 512 tokens
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started, load_before = announce("affinity")
    from engine_overhead import build_models

    model = build_models(["f16"])["gguf-f16"][1]
    wait_quiet(args.wait_quiet)
    summary: dict = {**run_facts("affinity", started, load_before, cpu_busy(0.5)),
                     "machine": machine_info(), "settings": vars(args)}
    summary["on"] = run_mode(True, model, args)
    summary["off"] = run_mode(False, model, args)
    gain = 1 - summary["on"]["follow_up_ttft_p50_ms"] / summary["off"]["follow_up_ttft_p50_ms"]
    summary["follow_up_ttft_p50_lower_by"] = round(gain, 3)
    print(f"follow-up TTFT p50 {gain:.0%} lower with affinity")
    save_summary("affinity", summary, indent=2)


if __name__ == "__main__":
    main()

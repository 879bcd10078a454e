"""Prefix-aware affinity (issues 8, 20): time to first token of the follow-up turns of
multi-turn conversations over two GGUF nodes, with ``LLMLB_AFFINITY`` on and off, and where new
conversations go while one node streams.

A balancer (``llmlb serve --role balancer``) and two ``llmlb node`` processes, each with the
~63M-parameter Llama of ``engine_overhead.py`` as GGUF f16. ``--users`` clients run at once;
each runs ``--conversations`` conversations one after the other, ``--turns`` turns each, every
conversation with its own long system prompt (``--prompt-words``). llama.cpp keeps the last
prompt's KV cache, so a follow-up turn that reaches the node which answered the previous one
(and saw nothing else in between) skips evaluating the shared prefix. TTFT: request sent ->
first content chunk (streamed, openai SDK). The same conversations run in every mode, the modes
taking turns conversation by conversation (all clusters up at once), so that a machine whose
load drifts disturbs them alike. While they run, ``/v0/nodes`` is sampled every 50 ms: the most
requests in flight on one node is reported with the bound affinity keeps
(``ceil(LLMLB_AFFINITY_LOAD_FACTOR x average)``).

The new-conversation case (issue 20): one long stream (``--long-tokens``) runs on a node; while
it streams, ``--quick`` new one-question conversations are sent one after the other. Reported:
the node each went to (the idle one is right: nothing of them is cached anywhere) and their
time to first token.

``--baseline PATH`` runs the "on" mode once more with the llmlb of another checkout (a ``git
worktree`` of an earlier commit, on ``PYTHONPATH``; the same venv), e.g. the hash ring before
issue 20, so that both algorithms meet the same conversations in one run.

    .venv/bin/python bench/affinity.py [--users 2] [--conversations 3] [--turns 5] [--quick 4]
        [--baseline PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
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


def start_cluster(affinity: bool, model: Path, tag: str, code: Path | None = None,
                  ) -> tuple[list, str, str]:
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
    if code is not None:  # another checkout's llmlb, first on the path (the same venv)
        common["PYTHONPATH"] = os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])
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


def stream_ttft(client, messages: list[dict], max_tokens: int) -> tuple[str, float, str]:  # noqa: ANN001
    """One streamed chat: the node, seconds to the first content chunk, the text."""
    sent = time.perf_counter()
    ttft, text = None, ""
    with client.chat.completions.with_streaming_response.create(
            model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0,
            stream=True) as response:
        node = response.headers["X-LLMLB-Node"]
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - sent
                text += chunk.choices[0].delta.content
    return node, ttft or 0.0, text


def new_conversations(url: str, api: str, args: argparse.Namespace) -> dict:
    """While one long stream runs on a node, ``--quick`` new conversations one at a time."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api, max_retries=0, timeout=300)
    long_node: dict = {}
    started = threading.Event()

    def long_stream() -> None:
        with client.chat.completions.with_streaming_response.create(
                model=MODEL_ID, max_tokens=args.long_tokens, temperature=0, stream=True,
                messages=[{"role": "user", "content": "Write a long story."}]) as response:
            long_node["node"] = response.headers["X-LLMLB-Node"]
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    started.set()
            long_node["ended"] = time.perf_counter()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    started.wait(120)
    quick = []
    for q in range(args.quick):
        node, ttft, _ = stream_ttft(client, [{"role": "user", "content": f"Quick question {q}: "
                                              f"name a colour."}], args.max_tokens)
        quick.append({"node": node, "ttft_ms": round(ttft * 1000, 1),
                      "while_streaming": "ended" not in long_node})
    streamer.join()
    busy = long_node["node"]
    during = [x for x in quick if x["while_streaming"]]
    idle = [x for x in during if x["node"] != busy]
    out = {"streaming_node": busy, "quick": quick,
           "to_idle_node": f"{len(idle)}/{len(during)}",
           "ttft_idle_node_ms": percentile([x["ttft_ms"] for x in idle], 50) if idle else None,
           "ttft_busy_node_ms": percentile([x["ttft_ms"] for x in during if x not in idle], 50)
           if len(idle) < len(during) else None}
    return out


class Mode:
    """One configuration measured: its cluster, and what its conversations met."""

    def __init__(self, label: str, affinity: bool, code: Path | None = None) -> None:
        self.label, self.affinity, self.code = label, affinity, code
        self.turns: list[dict] = []
        self.peak = {"max_node": 0, "max_total": 0}
        self.fresh: dict | None = None

    def start(self, model: Path) -> None:
        self.procs, self.url, keys = start_cluster(self.affinity, model,
                                                   self.label.replace(" ", "-"), self.code)
        self.api, self.admin = keys.split()

    def stop(self) -> None:
        for proc in reversed(getattr(self, "procs", [])):
            proc.stop()

    def sample(self) -> None:
        import requests

        data = requests.get(f"{self.url}/v0/nodes", timeout=10,
                            headers={"Authorization": f"Bearer {self.admin}"}).json()["data"]
        loads = [n["in_flight"] for n in data]
        self.peak["max_node"] = max(self.peak["max_node"], *loads)
        self.peak["max_total"] = max(self.peak["max_total"], sum(loads))

    def conversation(self, u: int, k: int, args: argparse.Namespace) -> None:
        """User ``u``'s conversation ``k``: the same text in every mode."""
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api, max_retries=0,
                               timeout=300)
        seed = 1000 * u + k
        messages = [{"role": "system", "content": system_prompt(seed, args.prompt_words)},
                    {"role": "user", "content": "Hello, who are you?"}]
        previous = None
        for turn in range(1, args.turns + 1):
            node, ttft, text = stream_ttft(client, messages, args.max_tokens)
            self.turns.append({"user": u, "conversation": seed, "turn": turn, "node": node,
                               "ttft_ms": round(ttft * 1000, 1), "same_node": previous == node})
            previous = node
            messages += [{"role": "assistant", "content": text},
                         {"role": "user", "content": f"Tell me more, part {turn + 1}."}]

    def summary(self) -> dict:
        turns = self.turns
        follow = [t for t in turns if t["turn"] > 1]
        ttfts = [t["ttft_ms"] for t in follow]
        out = {"mode": self.label, "affinity": self.affinity, "code": describe(self.code),
               "turns": len(turns), "follow_up_ttft_p50_ms": percentile(ttfts, 50),
               "follow_up_ttft_p90_ms": percentile(ttfts, 90),
               "first_turn_ttft_p50_ms": percentile([t["ttft_ms"] for t in turns
                                                     if t["turn"] == 1], 50),
               "follow_up_same_node": round(sum(t["same_node"] for t in follow) / len(follow),
                                            2),
               "requests_by_node": {n: sum(t["node"] == n for t in turns)
                                    for n in ("node-a", "node-b")},
               "max_in_flight_one_node": self.peak["max_node"],
               "max_in_flight_total": self.peak["max_total"],
               "new_conversations": self.fresh, "per_turn": turns}
        print(f"  {self.label}: follow-up TTFT p50 {out['follow_up_ttft_p50_ms']} ms, p90 "
              f"{out['follow_up_ttft_p90_ms']} ms (first turns "
              f"{out['first_turn_ttft_p50_ms']} ms); same node as the previous turn "
              f"{out['follow_up_same_node']:.0%}; by node {out['requests_by_node']}; most in "
              f"flight on one node {self.peak['max_node']} (of {self.peak['max_total']})",
              flush=True)
        if self.fresh:
            fresh = self.fresh
            print(f"  {self.label}: new conversations while {fresh['streaming_node']} streams: "
                  f"{fresh['to_idle_node']} to the idle node; TTFT p50 there "
                  f"{fresh['ttft_idle_node_ms']} ms, on the streaming node "
                  f"{fresh['ttft_busy_node_ms']} ms", flush=True)
        return out


def run_modes(modes: list[Mode], model: Path, args: argparse.Namespace) -> None:
    """Every mode's cluster up at once, the conversations taking turns between them (round
    k: conversation k of every user, on each mode in a rotating order), so that a machine
    whose load drifts disturbs every mode alike; then the new-conversation case."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for mode in modes:
                mode.sample()
            stop.wait(0.05)

    try:
        for mode in modes:
            mode.start(model)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for k in range(args.conversations):
            for mode in modes[k % len(modes):] + modes[:k % len(modes)]:
                users = [threading.Thread(target=mode.conversation, args=(u, k, args))
                         for u in range(args.users)]
                for t in users:
                    t.start()
                for t in users:
                    t.join()
        if args.quick:
            for mode in modes:
                mode.fresh = new_conversations(mode.url, mode.api, args)
    finally:
        stop.set()
        for mode in modes:
            mode.stop()


def describe(code: Path | None) -> str:
    """The commit of the llmlb measured: this checkout's, or another's."""
    where = code or REPO
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=60)  # the model holds 512 tokens
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--quick", type=int, default=4,
                        help="new conversations sent while one node streams (0: skip)")
    parser.add_argument("--long-tokens", type=int, default=400)
    parser.add_argument("--baseline", type=Path, default=None, metavar="PATH",
                        help="also run affinity on with the llmlb of this checkout")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started, load_before = announce("affinity")
    from engine_overhead import build_models

    model = build_models(["f16"])["gguf-f16"][1]
    wait_quiet(args.wait_quiet)
    summary: dict = {**run_facts("affinity", started, load_before, cpu_busy(0.5)),
                     "machine": machine_info(),
                     "settings": {k: str(v) if isinstance(v, Path) else v
                                  for k, v in vars(args).items()}}
    modes = [Mode("on", True), Mode("off", False)]
    if args.baseline is not None:
        modes.append(Mode(f"on at {describe(args.baseline)}", True, args.baseline.resolve()))
    run_modes(modes, model, args)
    for key, mode in zip(("on", "off", "baseline"), modes, strict=False):
        summary[key] = mode.summary()
    gain = 1 - summary["on"]["follow_up_ttft_p50_ms"] / summary["off"]["follow_up_ttft_p50_ms"]
    summary["follow_up_ttft_p50_lower_by"] = round(gain, 3)
    print(f"follow-up TTFT p50 {gain:.0%} lower with affinity")
    save_summary("affinity", summary, indent=2)


if __name__ == "__main__":
    main()

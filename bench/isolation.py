"""Hostile prompts (issue 13, finding 1): how fast the largest prompts the limits allow are
refused, whether a small chat to another model notices, and which compute-thread layout keeps
models apart best.

Model: the random ~63M-parameter Llama of ``engine_overhead.py`` as GGUF f16, installed twice
in one ``llmlb serve`` (defaults: ``LLMLB_MAX_MESSAGES`` 2048, ``LLMLB_MAX_PROMPT_CHARS`` 1M):
``target`` receives the hostile prompts, ``bystander`` the small chats.

1. **Refusal**, raw HTTP, server-side time: (a) 20,000 short messages (over the message limit);
   (b) the largest chat the limits allow: 2048 messages of 488 characters (999,424 characters),
   over the model's context once tokenized; (c) one message of 99,999 ``<|im_end|>`` strings
   (999,990 characters), tokenized as text. Each is sent ``--refusals`` times; median and max.
2. **Bystander**: ``--chats`` small chats to ``bystander`` (8 tokens, ``temperature=0``), one
   after the other: p50/p99 latency, (a) alone; (b) while a second client sends the hostile
   prompts above to ``target``, ``--hostile-rate`` a second (default 5); (c) the same back to
   back (a flood: about 1 MB per request, as fast as one client can send; on 2 cores any
   flood of big requests slows everything, hostile or not); (d) (b) plus a third client
   sending legitimate long prompts (about 420 tokens, the model's context is 512) back to
   back, which ``target`` really computes, sharing the compute thread.
3. **Layout** (``--layout``): the choice the issue asks to measure, without llmlb: two llama.cpp
   contexts of the same model, A reading 420-token prompts over and over in 128-token chunks, B
   answering small chats (8 tokens). *time-slice*: one thread, the next step to whichever has
   used less time (llmlb's compute thread); *alternate*: one thread, one step of A after each
   step of B (a naive time slice); *thread per model*: each context on its own thread at
   once, each with all cores (OpenMP teams per thread). B's latency p50/p99 and A's prompt
   tokens/s, against B alone, and against B alone after A computed on a thread of its own
   that stays alive (what a thread per model costs a model used on its own).

Run: ``.venv/bin/python bench/isolation.py [--chats 200] [--refusals 3] [--hostile-rate 5]
[--layout]``; the
JSON summary is the last line, also saved as ``bench/.work/results/isolation-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (
    AUTH,
    CLOSED_ENDPOINT,
    REPO,
    WORK_ROOT,
    add_quiet_args,
    announce,
    clean_env,
    free_port,
    llmlb_serve_cmd,
    percentile,
    run_facts,
    save_summary,
    start_server,
)
from cpuwatch import cpu_busy, wait_quiet
from engine_overhead import build_models

SMALL = [{"role": "user", "content": "Hello! How are you today?"}]
# 402 tokens with this model's tokenizer, about 420 with the template: fits the 512-token
# context with room for the answer
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def hostile_bodies() -> dict[str, bytes]:
    bodies = {
        "20k messages": [{"role": "user", "content": "hi"}] * 20_000,
        "2048 x 488 chars": [{"role": "user", "content": ("lorem ipsum " * 41)[:488]}] * 2048,
        "99,999 <|im_end|>": [{"role": "user", "content": "<|im_end|>" * 99_999}],
    }
    return {name: json.dumps({"model": "target", "messages": m, "max_tokens": 1}).encode()
            for name, m in bodies.items()}


def post(session, url: str, body: bytes) -> tuple[int, str, float]:  # noqa: ANN001
    started = time.monotonic()
    r = session.post(f"{url}/v1/chat/completions", data=body, timeout=600,
                     headers={**AUTH, "Content-Type": "application/json"})
    took = time.monotonic() - started
    code = r.json().get("error", {}).get("code") if r.status_code != 200 else "ok"
    return r.status_code, code, took


def small_chat(session, url: str) -> float:  # noqa: ANN001
    status, code, took = post(session, url, json.dumps(
        {"model": "bystander", "messages": SMALL, "max_tokens": 8,
         "temperature": 0}).encode())
    if status != 200:
        raise RuntimeError(f"bystander chat failed: {status} {code}")
    return took


def through_llmlb(args: argparse.Namespace, model: Path) -> dict:
    import requests

    work = WORK_ROOT / "isolation"
    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    for name in ("target", "bystander"):
        (home / "models" / name).mkdir(parents=True)
        shutil.copy(model, home / "models" / name / "model.gguf")
    port = free_port()
    env = clean_env(LLMLB_HOME=str(home), LLMLB_DEV="1", HF_ENDPOINT=CLOSED_ENDPOINT,
                    LLMLB_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    server = start_server(llmlb_serve_cmd(port), env, work / "llmlb.log", port, name="llmlb")
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        session = requests.Session()
        small_chat(session, url)
        post(session, url, json.dumps({"model": "target", "messages": SMALL,
                                       "max_tokens": 1}).encode())
        print("refusals (server-side seconds):", flush=True)
        refusals = {}
        for name, body in hostile_bodies().items():
            runs = [post(session, url, body) for _ in range(args.refusals)]
            codes = sorted({f"{s} {c}" for s, c, _ in runs})
            times = [t for _, _, t in runs]
            refusals[name] = {"answer": codes, "median_s": round(statistics.median(times), 3),
                              "max_s": round(max(times), 3)}
            print(f"  {name:20s} {codes} median {refusals[name]['median_s']:.3f} s, "
                  f"max {refusals[name]['max_s']:.3f} s", flush=True)
        out["refusals"] = refusals

        def under(rate: float | None, long_prompts: bool) -> tuple[list[float], dict]:
            """The bystander's chats while another client sends hostile prompts to the
            target, ``rate`` a second (None: back to back), and with ``long_prompts``
            legitimate long ones too, back to back, from a third client."""
            stop = threading.Event()
            sent = {"hostile": 0, "long": 0}

            def hostile() -> None:
                s = requests.Session()
                bodies = list(hostile_bodies().values())
                i, started = 0, time.monotonic()
                while not stop.is_set():
                    post(s, url, bodies[i % len(bodies)])
                    sent["hostile"] += 1
                    i += 1
                    if rate:
                        stop.wait(max(0.0, started + i / rate - time.monotonic()))

            def long_ones() -> None:
                s = requests.Session()
                body = json.dumps({"model": "target", "max_tokens": 4, "messages": [
                    {"role": "user", "content": LONG_TEXT}]}).encode()
                while not stop.is_set():
                    status, code, _ = post(s, url, body)
                    if status != 200:
                        raise RuntimeError(f"long prompt failed: {code}")
                    sent["long"] += 1

            threads = [threading.Thread(target=hostile, daemon=True)]
            if long_prompts:
                threads.append(threading.Thread(target=long_ones, daemon=True))
            for t in threads:
                t.start()
            times = [small_chat(session, url) for _ in range(args.chats)]
            stop.set()
            for t in threads:
                t.join(timeout=600)
            return times, sent

        def figures(times: list[float]) -> dict:
            return {"p50_ms": round(percentile(times, 50) * 1000, 1),
                    "p99_ms": round(percentile(times, 99) * 1000, 1)}

        out["bystander"] = {"alone": figures([small_chat(session, url)
                                              for _ in range(args.chats)])}
        for name, rate, long_prompts in (
                (f"hostile {args.hostile_rate:g}/s", args.hostile_rate, False),
                ("hostile flood", None, False),
                (f"hostile {args.hostile_rate:g}/s + long", args.hostile_rate, True)):
            times, sent = under(rate, long_prompts)
            out["bystander"][name] = {**figures(times), "sent": sent}
        print("bystander chat (8 tokens), p50 / p99 ms:", flush=True)
        for name, fig in out["bystander"].items():
            extra = f"   (target got {fig['sent']})" if "sent" in fig else ""
            print(f"  {name:24s} {fig['p50_ms']:7.1f} / {fig['p99_ms']:7.1f}{extra}",
                  flush=True)
    finally:
        server.stop()
    return out


# --- the layout experiment (a separate process: llama.cpp only) ---------------------------

LAYOUT_WORKER = r'''
import json, os, sys, threading, time
import llama_cpp
from llama_cpp import _internals as I
import logging
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
path, layout, chats = sys.argv[1], sys.argv[2], int(sys.argv[3])
cores = os.cpu_count() or 1

def context():
    mp = llama_cpp.llama_model_default_params(); mp.n_gpu_layers = 0
    model = I.LlamaModel(path_model=path, params=mp, verbose=True)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 512; cp.n_batch = cp.n_ubatch = 512; cp.n_threads = cp.n_threads_batch = cores
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED; cp.no_perf = True
    ctx = I.LlamaContext(model=model, params=cp, verbose=True)
    return model, ctx, llama_cpp.llama_batch_init(512, 0, 1)

def decode(ctx, batch, tokens, pos0):
    batch.n_tokens = 0
    for i, t in enumerate(tokens):
        batch.token[i] = t; batch.pos[i] = pos0 + i; batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0; batch.logits[i] = int(i == len(tokens) - 1)
        batch.n_tokens = i + 1
    assert llama_cpp.llama_decode(ctx.ctx, batch) == 0

def chat_steps(model, ctx, batch):
    """One small chat as steps: its prompt, then 8 one-token steps (the same work as
    generating 8 tokens; which token is fed does not change the cost)."""
    llama_cpp.llama_memory_clear(ctx.memory, True)
    prompt = model.tokenize(b"Hello! How are you today?", True, False)
    decode(ctx, batch, prompt, 0)
    yield 1
    for i in range(8):
        decode(ctx, batch, [prompt[-1]], len(prompt) + i)
        yield 1

def prompt_steps(model, ctx, batch):
    """Forever: a 420-token prompt read in 128-token chunks."""
    text = model.tokenize(("The quick brown fox jumps over the lazy dog. " * 42).encode(),
                          True, False)[:420]
    while True:
        llama_cpp.llama_memory_clear(ctx.memory, True)
        for start in range(0, len(text), 128):
            decode(ctx, batch, text[start:start + 128], start)
            yield len(text[start:start + 128])

a = context(); b = context()
latencies, prompt_tokens = [], [0]
stop = threading.Event()
started = time.monotonic()
if layout == "alone":
    for _ in range(chats):
        t = time.monotonic(); list(chat_steps(*b)); latencies.append(time.monotonic() - t)
elif layout == "alternate":
    hostile = prompt_steps(*a)
    for _ in range(chats):
        t = time.monotonic()
        for _ in chat_steps(*b):
            prompt_tokens[0] += next(hostile)   # one step of A between two steps of B
        latencies.append(time.monotonic() - t)
elif layout == "time-slice":
    # llmlb's compute thread: the next step goes to whichever has used less time (B's chats
    # come back to back, so both always want the thread: half each).
    hostile = prompt_steps(*a)
    used = {"a": 0.0, "b": 0.0}
    for _ in range(chats):
        t = time.monotonic()
        steps = chat_steps(*b)
        while True:
            s0 = time.perf_counter()
            if used["b"] <= used["a"]:
                if next(steps, None) is None:
                    break
                used["b"] += time.perf_counter() - s0
            else:
                prompt_tokens[0] += next(hostile)
                used["a"] += time.perf_counter() - s0
        latencies.append(time.monotonic() - t)
elif layout == "alone, 2 threads":
    # B alone, after A computed on a thread of its own that stays alive (idle, as a model's
    # thread would between requests): does the idle team slow B down?
    idle = threading.Event()
    def run_a_once():
        for i, n in enumerate(prompt_steps(*a)):
            if i == 8:
                break
        idle.wait()
    th = threading.Thread(target=run_a_once); th.start()
    time.sleep(2)
    for _ in range(chats):
        t = time.monotonic(); list(chat_steps(*b)); latencies.append(time.monotonic() - t)
    idle.set(); th.join()
else:
    def run_a():
        for n in prompt_steps(*a):
            prompt_tokens[0] += n
            if stop.is_set():
                return
    th = threading.Thread(target=run_a); th.start()
    for _ in range(chats):
        t = time.monotonic(); list(chat_steps(*b)); latencies.append(time.monotonic() - t)
    stop.set(); th.join()
elapsed = time.monotonic() - started
print(json.dumps({"latencies": latencies, "prompt_tok_s": prompt_tokens[0] / elapsed}))
'''


def layout_experiment(args: argparse.Namespace, model: Path) -> dict:
    out = {}
    for layout in ("alone", "alone, 2 threads", "time-slice", "alternate", "thread-per-model"):
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        result = subprocess.run([sys.executable, "-c", LAYOUT_WORKER, str(model), layout,
                                 str(args.chats)], capture_output=True, text=True,
                                env=clean_env(from_options=False), check=True)
        data = json.loads(result.stdout.strip().splitlines()[-1])
        lat = data["latencies"]
        out[layout] = {"p50_ms": round(percentile(lat, 50) * 1000, 1),
                       "p99_ms": round(percentile(lat, 99) * 1000, 1),
                       "prompt_tok_s": round(data["prompt_tok_s"], 1)}
        print(f"  {layout:17s} B p50 {out[layout]['p50_ms']:7.1f} ms  p99 "
              f"{out[layout]['p99_ms']:7.1f} ms   A reads {out[layout]['prompt_tok_s']:7.1f} "
              "prompt tok/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--refusals", type=int, default=3)
    parser.add_argument("--hostile-rate", type=float, default=5.0, metavar="PER_SECOND",
                        help="hostile prompts a second while the bystander is timed")
    parser.add_argument("--layout", action="store_true", help="also run the layout experiment")
    add_quiet_args(parser, foreign_help="(reported, not enforced here)")
    args = parser.parse_args()
    model = build_models(["f16"])["gguf-f16"][1]
    started, load_before = announce("isolation")
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else cpu_busy(1)
    summary = {**run_facts("isolation", started, load_before, busy), "chats": args.chats}
    summary.update(through_llmlb(args, model))
    if args.layout:
        print("layout: B's small chats while A reads long prompts", flush=True)
        summary["layout"] = layout_experiment(args, model)
    summary["load_avg_after"] = round(os.getloadavg()[0], 2)
    save_summary("isolation", summary, indent=2)


if __name__ == "__main__":
    main()

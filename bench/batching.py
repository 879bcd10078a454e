"""Batching: aggregate tokens/s with 1, 2, 4 and 8 concurrent streams on one model, and time
to first token, through llmlb and through llama.cpp's own server.

Models: the random ~63M-parameter Llama of ``engine_overhead.py`` (built once under
``bench/.work/models/``) as GGUF f16 and f32 (llama.cpp) and safetensors (transformers).

Sides:

* **llmlb**: ``llmlb serve`` at its default settings (each model's parallel sequences chosen
  from memory; ``--parallel N`` sets ``LLMLB_PARALLEL_SEQUENCES``), all three models
  installed; the number each model got (``GET /v0/engines``) is printed and saved.
* **llama-server** (the anchor, GGUF only): llama.cpp's own server built from the llama.cpp
  vendored in the llama-cpp-python 0.3.36 sdist (from pip's cache, or ``pip download``), with
  the Makefile's CPU flags, once, into ``bench/.work/llama-server/`` (about 6 minutes on 2
  cores); run as ``-np 8 -c <8 x 512> --kv-unified -fa off -t <cores>``: like llmlb, eight
  sequences share one KV cache with 512 tokens of room each, flash attention off.

Workload: for n in 1, 2, 4, 8, ``--rounds`` rounds (default 3) of n clients that start
together and stream one chat each (``temperature=0``, ``max_tokens=128``; the model never emits
EOS, so each stream is exactly 128 tokens, checked). Every chat has the same system prompt and
its own user turn (different per client and per round), so a server may reuse the system
prompt's KV but never a whole prompt. Clients are minimal HTTP clients (one thread each), the
same for both servers. Per round: aggregate tok/s = all tokens / (first request sent -> last
stream done); time to first token per stream (sent -> first content). Figures: the median
round's tok/s per n, p50/p95 TTFT over all streams at n=1 and n=8, the TTFT ratio 8 / 1
(p50: the goal is at most 3), the 8-stream / 1-stream speed-up and llmlb / llama-server at 8
streams (the goal: at least 1.0 at llmlb's defaults). The two servers run side by side and take
turns round by round, so that a disturbance hits both alike; a block (one model and n) during
which other processes took more than ``--max-foreign`` of the cores is measured again once.

Run: ``.venv/bin/python bench/batching.py [--rounds 3] [--models gguf-f16,gguf-f32,safetensors]
[--no-anchor] [--parallel N] [--baseline DIR]``. ``--baseline DIR`` adds a side
``llmlb-base``: llmlb from another checkout (say main, ``git archive main | tar -x -C DIR``)
with the same settings, so that a change is measured against what it replaces in one run. The last line printed is the JSON summary, also saved as
``bench/.work/results/batching-<time>.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from common import (
    CLOSED_ENDPOINT,
    DEV_API_KEY,
    REPO,
    WORK_ROOT,
    Monitor,
    Proc,
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

LLAMA_CPP_PYTHON = "0.3.36"
SERVER_DIR = WORK_ROOT / "llama-server"
SERVER_BIN = SERVER_DIR / "build" / "bin" / "llama-server"
# The Makefile's portable CPU build, plus the server and nothing that needs the network.
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
STREAMS = (1, 2, 4, 8)
SLOT_CONTEXT = 512  # the bench model's trained context: room per sequence on both servers
MAX_TOKENS = 128
SYSTEM = ("You are a helpful assistant who answers briefly and precisely, and who always "
          "explains the reasoning behind each answer in plain words.")
TOPICS = ["a fox in Paris", "the weather in Tokyo", "a journey of a thousand miles",
          "numbers like 42 and 3.14159", "Alice and Bob", "the best of times",
          "a lazy dog", "tokens and language models"]


# --- llama-server -----------------------------------------------------------------------------

def sdist() -> Path:
    """llama-cpp-python's source archive: pip's cache if it has it, else ``pip download``."""
    target = SERVER_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not target.exists():
        SERVER_DIR.mkdir(parents=True, exist_ok=True)
        print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", str(SERVER_DIR)], check=True)
    return target


def build_llama_server() -> Path:
    """Build llama.cpp's server from the vendored sources, once."""
    if SERVER_BIN.exists():
        return SERVER_BIN
    source = SERVER_DIR / "src"
    if not (source / "CMakeLists.txt").exists():
        shutil.rmtree(source, ignore_errors=True)
        with tarfile.open(sdist()) as archive:
            prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            archive.extractall(source, members=members, filter="data")
    build = SERVER_DIR / "build"
    jobs = str(os.cpu_count() or 2)
    print(f"building llama-server into {build} (several minutes) ...", flush=True)
    started = time.monotonic()
    log = SERVER_DIR / "build.log"
    with log.open("w") as out:
        for cmd in (["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
                    ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama-server failed; see {log}")
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return SERVER_BIN


def start_llama_server(model: Path, port: int, log: Path) -> Proc:
    args = [str(SERVER_BIN), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", "8", "-c", str(8 * SLOT_CONTEXT), "--kv-unified", "-fa", "off",
            "-t", str(os.cpu_count() or 1), "-ngl", "0", "--no-webui"]
    return start_server(args, clean_env(), log, port, name="llama-server", timeout=120)


# --- the client -------------------------------------------------------------------------------

def messages(round_no: int, client: int) -> list[dict]:
    topic = TOPICS[client % len(TOPICS)]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Round {round_no}, client {client}: tell a short "
                                        f"story about {topic}."}]


def stream_one(port: int, model: str, msgs: list[dict], out: dict,
               start: threading.Barrier) -> None:
    """One streamed chat: when it was sent, its first content, its end, its content chunks."""
    body = json.dumps({"model": model, "messages": msgs, "max_tokens": MAX_TOKENS,
                       "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    out["sent"] = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {DEV_API_KEY}"})
    response = conn.getresponse()
    if response.status != 200:
        out["error"] = f"{response.status} {response.read()[:300]!r}"
        return
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                out.setdefault("first", time.monotonic())
                tokens += 1
    out["end"] = time.monotonic()
    out["tokens"] = tokens
    conn.close()


def one_round(port: int, model: str, n: int, round_no: int) -> list[dict]:
    results: list[dict] = [{} for _ in range(n)]
    start = threading.Barrier(n)
    threads = [threading.Thread(target=stream_one,
                                args=(port, model, messages(round_no, i), results[i], start))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{model}: {errors[0]}")
    return results


def measure(sides: dict[str, tuple[int, str]], rounds: int, max_foreign: float) -> dict:
    """Every n: ``rounds`` rounds per side, the sides taking turns round by round (so that a
    disturbance hits both alike); per side the median round's tok/s and every stream's TTFT.
    ``sides``: name -> (port, model name on that server)."""
    figures: dict = {side: {} for side in sides}
    round_no = 1000
    for n in STREAMS:
        for attempt in range(2):
            monitor = Monitor()
            monitor.start()
            speeds: dict = {side: [] for side in sides}
            ttfts: dict = {side: [] for side in sides}
            counts = []
            for _ in range(rounds):
                round_no += 1
                for side, (port, model) in sides.items():
                    results = one_round(port, model, n, round_no)
                    tokens = sum(r["tokens"] for r in results)
                    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
                    speeds[side].append(tokens / wall)
                    ttfts[side] += [r["first"] - r["sent"] for r in results]
                    counts += [r["tokens"] for r in results]
            foreign = monitor.foreign()
            if foreign <= max_foreign or attempt == 1:
                break
            print(f"    n={n}: other processes took {foreign:.0%} ({monitor.culprits()}); "
                  "measuring again", flush=True)
        if any(c != MAX_TOKENS for c in counts):
            print(f"    warning: streams of {sorted(set(counts))} tokens, not {MAX_TOKENS}")
        for side in sides:
            fig = figures[side][n] = {
                "tok_s": round(statistics.median(speeds[side]), 1),
                "ttft_p50_ms": round(percentile(ttfts[side], 50) * 1000, 1),
                "ttft_p95_ms": round(percentile(ttfts[side], 95) * 1000, 1),
                "foreign": round(foreign, 3)}
            print(f"    n={n} {side:12s} {fig['tok_s']:7.1f} tok/s   TTFT p50 "
                  f"{fig['ttft_p50_ms']:7.1f} ms  p95 {fig['ttft_p95_ms']:7.1f} ms", flush=True)
    return figures


# --- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="gguf-f16,gguf-f32,safetensors")
    parser.add_argument("--no-anchor", action="store_true", help="skip llama-server")
    parser.add_argument("--parallel", type=int, default=None,
                        help="LLMLB_PARALLEL_SEQUENCES for llmlb (default: llmlb's own choice)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run llmlb from this checkout (e.g. `git archive main`), "
                             "side by side with the same settings: side 'llmlb-base'")
    parser.add_argument("--build-only", action="store_true",
                        help="build the models and llama-server, measure nothing")
    add_quiet_args(parser, foreign_help="redo a block when other processes took more than "
                                        "this share of the cores")
    args = parser.parse_args()
    wanted = args.models.split(",")
    gguf_dtypes = [m.split("-", 1)[1] for m in wanted if m.startswith("gguf-")]
    models = {k: v for k, v in build_models(gguf_dtypes).items() if k in wanted}
    anchor = not args.no_anchor and any(m.startswith("gguf") for m in wanted)
    if anchor:
        build_llama_server()
    if args.build_only:
        return
    started, load_before = announce("batching")
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else cpu_busy(1)
    work = WORK_ROOT / "batching"
    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    (home / "models").mkdir(parents=True)
    for name, (fmt, src) in models.items():
        dst = home / "models" / f"bench-{name}"
        if fmt == "gguf":
            dst.mkdir()
            shutil.copy(src, dst / "model.gguf")
        else:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    results: dict = {}
    port = free_port()
    env = clean_env(LLMLB_HOME=str(home), LLMLB_DEV="1", HF_ENDPOINT=CLOSED_ENDPOINT,
                    LLMLB_MAX_LOADED_MODELS=str(len(models)),
                    LLMLB_KEEP_ALIVE_SECONDS="86400",  # loaded from warm-up to the end
                    LLMLB_LOG_LEVEL="WARNING", PYTHONPATH=str(REPO))
    if args.parallel is not None:
        env["LLMLB_PARALLEL_SEQUENCES"] = str(args.parallel)
    slots: dict[tuple[str, str], int | None] = {}
    servers = {"llmlb": (port, start_server(llmlb_serve_cmd(port), env, work / "llmlb.log",
                                            port, name="llmlb"))}
    try:
        if args.baseline:  # the same settings, another checkout's code, its own home
            base_port = free_port()
            shutil.copytree(home, work / "home-base", copy_function=os.link)
            base_env = {**env, "LLMLB_HOME": str(work / "home-base"),
                        "PYTHONPATH": str(Path(args.baseline).resolve())}
            servers["llmlb-base"] = (base_port, start_server(
                llmlb_serve_cmd(base_port), base_env, work / "llmlb-base.log", base_port,
                name="llmlb (baseline)"))
        for name, (fmt, src) in models.items():
            sides = {side: (p, f"bench-{name}") for side, (p, _) in servers.items()}
            anchor_proc = None
            if anchor and fmt == "gguf":
                anchor_port = free_port()
                anchor_proc = start_llama_server(src, anchor_port,
                                                 work / f"llama-server-{name}.log")
                sides["llama-server"] = (anchor_port, name)
            try:
                print(f"{name}: {', '.join(sides)}", flush=True)
                for side, (side_port, model) in sides.items():
                    one_round(side_port, model, 8, 0)  # load and warm up
                    if side in servers:
                        slots[(name, side)] = llmlb_parallel(side_port, model)
                        print(f"    {side} decodes {slots[(name, side)]} sequences at once",
                              flush=True)
                for side, figs in measure(sides, args.rounds, args.max_foreign).items():
                    results[(name, side)] = figs
            finally:
                if anchor_proc is not None:
                    anchor_proc.stop()
    finally:
        for _, proc in servers.values():
            proc.stop()
    report(results, args, started, load_before, busy, slots)


def llmlb_parallel(port: int, model: str) -> int | None:
    """The parallel sequences llmlb gave a loaded model (GET /v0/engines)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v0/engines", headers={"Authorization": f"Bearer {DEV_API_KEY}"})
    loaded = json.loads(conn.getresponse().read()).get("loaded", [])
    conn.close()
    return next((m.get("parallel") for m in loaded if m.get("id") == model), None)


def report(results: dict, args: argparse.Namespace, started: float, load_before: float,
           busy: float, slots: dict[tuple[str, str], int | None]) -> None:
    print("\n| model | server | " + " | ".join(f"{n} stream{'s' * (n > 1)} tok/s"
                                             for n in STREAMS)
          + " | 8 / 1 | TTFT p50/p95 ms at 1 | at 8 | TTFT 8 / 1 (p50) |")
    print("|---" * (len(STREAMS) + 6) + "|")
    rows = []
    for (name, side), fig in results.items():
        gain = fig[8]["tok_s"] / fig[1]["tok_s"]
        anchor = results.get((name, "llama-server"))
        rows.append({"model": name, "server": side, **{f"tok_s_{n}": fig[n]["tok_s"]
                                                      for n in STREAMS},
                     "speedup_8": round(gain, 2),
                     "ttft_1": [fig[1]["ttft_p50_ms"], fig[1]["ttft_p95_ms"]],
                     "ttft_8": [fig[8]["ttft_p50_ms"], fig[8]["ttft_p95_ms"]],
                     "ttft_ratio_8_1": round(fig[8]["ttft_p50_ms"] / fig[1]["ttft_p50_ms"], 2),
                     "parallel": slots.get((name, side), 8),
                     "vs_llama_server_8": round(fig[8]["tok_s"] / anchor[8]["tok_s"], 3)
                     if anchor and side.startswith("llmlb") else None,
                     "foreign": max(fig[n]["foreign"] for n in STREAMS)})
        print(f"| {name} | {side} | " + " | ".join(f"{fig[n]['tok_s']:.1f}" for n in STREAMS)
              + f" | {gain:.2f}x | {fig[1]['ttft_p50_ms']:.0f} / {fig[1]['ttft_p95_ms']:.0f}"
              f" | {fig[8]['ttft_p50_ms']:.0f} / {fig[8]['ttft_p95_ms']:.0f}"
              f" | {fig[8]['ttft_p50_ms'] / fig[1]['ttft_p50_ms']:.2f}x |")
    for row in rows:
        if row["vs_llama_server_8"] is not None:
            print(f"{row['model']}: {row['server']} / llama-server at 8 streams = "
                  f"{row['vs_llama_server_8']:.2f}")
    summary = {**run_facts("batching", started, load_before, busy), "rounds": args.rounds,
               "max_tokens": MAX_TOKENS, "llmlb_parallel_setting": args.parallel,
               "baseline": args.baseline, "rows": rows}
    save_summary("batching", summary, indent=2)


if __name__ == "__main__":
    main()

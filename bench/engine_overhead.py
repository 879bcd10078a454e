"""Engine overhead: tokens/s and time to first token through llmlb's HTTP API versus the same
library called directly on the same model.

For each model (GGUF f16 and f32 with llama-cpp-python, safetensors with transformers + torch,
all with the same random ~63M-parameter Llama weights from ``tests.tinymodels``):

* **llmlb**: a real ``llmlb serve`` process; the official ``openai`` SDK streams
  ``/v1/chat/completions`` (``temperature=0``, ``max_tokens=N``) and times every chunk.
* **direct**: a worker process per model that loads it and generates exactly the way
  ``engines/gguf.py`` and ``engines/safetensors.py`` do (same constructor arguments, chat
  template, tokenisation, sampling parameters, streaming and incremental detokenisation), with
  no HTTP, no Flask and no llmlb code at all.
* **raw** (a diagnostic, ``--no-raw`` skips it): llmlb again, read by a minimal socket client
  instead of the SDK, to show how much of the gap is the client's own CPU time, which on a
  small machine competes with the model for the same cores.

All processes keep their models loaded; the sides take turns (the order rotates, so each
comes first after a model switch equally often) and only one of them computes at a time, so
they never share the cores. A
repetition during which other processes took more than 5% of the cores is measured again
(``cpuwatch.py``). The tiny models never emit EOS, so every run generates exactly
``max_tokens`` tokens (checked against ``usage``), and greedy decoding must give the same text
on every side (checked too).

Figures, per model, medians over the repetitions:

* TTFT: request sent (direct: before the chat template is applied) -> first non-empty text.
* decode tok/s: (tokens - 1) / (last token - first token), the steady generation rate.
* end-to-end tok/s: tokens / (request sent -> stream finished).
* ratio: llmlb / direct decode tok/s (goal >= 0.95).

Run: ``.venv/bin/python bench/engine_overhead.py [--reps 6] [--max-tokens 128]``. Models and
the server's home live under ``bench/.work/``; the last line printed is the JSON summary, also
saved as ``bench/.work/results/engine_overhead-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from common import (
    CLOSED_ENDPOINT,
    DEV_API_KEY,
    REPO,
    WAIT_QUIET_OTHERS_HELP,
    WORK_ROOT,
    Proc,
    add_quiet_args,
    clean_env,
    free_port,
    llmlb_serve_cmd,
    machine_info,
    save_summary,
    start_server,
)
from cpuwatch import CpuMonitor, wait_quiet

MODELS = WORK_ROOT / "models"

MODEL_SHAPE = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4,
                   intermediate_size=2048, vocab_size=8192)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a fox who travels from Paris to "
                                "Tokyo, and what it learns on the way."},
]
# Same as engines/textgen.FALLBACK_CHAT_TEMPLATE (only used when a model ships none).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT_LENGTH = 4096  # llmlb's default LLMLB_CONTEXT_LENGTH
ALL_MODELS = ("gguf-f16", "gguf-f32", "safetensors")


# --- models -----------------------------------------------------------------------------------

def build_models(gguf_dtypes: list[str]) -> dict[str, tuple[str, Path]]:
    """name -> (format, path); built once under bench/.work/models and reused."""
    sys.path.insert(0, str(REPO))
    from tests.tinymodels import make_llama_gguf, make_llama_safetensors

    st_dir = MODELS / "llama-63m-st"
    marker = st_dir / ".complete"
    if not marker.exists():
        print(f"building the safetensors model in {st_dir} ...", flush=True)
        shutil.rmtree(st_dir, ignore_errors=True)
        make_llama_safetensors(st_dir, **MODEL_SHAPE)
        marker.write_text(json.dumps(MODEL_SHAPE))
    models: dict[str, tuple[str, Path]] = {}
    for dtype in gguf_dtypes:
        path = MODELS / f"llama-63m-{dtype}.gguf"
        if not path.exists() or path.stat().st_mtime < marker.stat().st_mtime:
            print(f"building {path.name} ...", flush=True)
            tmp = path.with_suffix(".tmp")
            make_llama_gguf(st_dir, tmp, dtype=dtype)
            tmp.replace(path)
        models[f"gguf-{dtype}"] = ("gguf", path)
    models["safetensors"] = ("safetensors", st_dir)
    return models


def install_models(home: Path, models: dict[str, tuple[str, Path]]) -> dict[str, str]:
    """Copy each model into <home>/models/<id>/ the way an operator would; name -> model id."""
    ids = {}
    for name, (fmt, src) in models.items():
        model_id = f"bench-{name}"
        dst = home / "models" / model_id
        dst.mkdir(parents=True)
        if fmt == "gguf":
            shutil.copy(src, dst / "model.gguf")
        else:
            for f in src.iterdir():
                if not f.name.startswith("."):
                    shutil.copy(f, dst / f.name)
        ids[name] = model_id
    return ids


# --- the direct worker (a separate process) ---------------------------------------------------

class DirectGGUF:
    """engines/gguf.py's GGUFEngine.load + GGUFModel.chat, with llama-cpp-python only."""

    def __init__(self, path: Path) -> None:
        import llama_cpp
        from gguf import GGUFReader
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fields = GGUFReader(str(path)).fields
        arch = str(fields["general.architecture"].contents())
        trained_field = fields.get(f"{arch}.context_length")
        trained = int(trained_field.contents()) if trained_field else CONTEXT_LENGTH
        self.llm = llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=min(trained, CONTEXT_LENGTH),
            n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0,
            n_threads=os.cpu_count() or 1,
            embedding=False,
            verbose=False,
        )
        self.lib = llama_cpp
        eos, bos = llm.token_eos(), llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=llm.metadata.get("tokenizer.chat_template") or FALLBACK_CHAT_TEMPLATE,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        import codecs
        import random

        llm = self.llm
        t0 = time.perf_counter()
        formatted = self.formatter(messages=messages)
        tokens = llm.tokenize(formatted.prompt.encode("utf-8"),
                              add_bos=not formatted.added_special, special=True)
        llm.set_seed(random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        times, parts, produced = [], [], 0
        for token in llm.generate(tokens, temp=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                  repeat_penalty=1.0):
            if self.lib.llama_vocab_is_eog(llm._model.vocab, token):
                break
            produced += 1
            text = decoder.decode(llm.detokenize([token]))
            if text:
                times.append(time.perf_counter())
                parts.append(text)
            if produced >= max_tokens:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            times.append(time.perf_counter())
            parts.append(tail)
        t_end = time.perf_counter()
        return _timing(t0, times, t_end, produced, "".join(parts), len(tokens))


class DirectTransformers:
    """engines/safetensors.py's SafetensorsEngine.load + CausalLM.chat, with transformers and
    torch only: generate() in a thread, a streamer that queues token ids, windowed decoding."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch.cuda.is_available():
            device = "cuda"
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            device, dtype = "cpu", torch.float32
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        self.eos = {i for i in [*ids, self.tok.eos_token_id] if i is not None}
        if not getattr(self.tok, "chat_template", None):
            self.tok.chat_template = FALLBACK_CHAT_TEMPLATE

    def run(self, messages: list[dict], max_tokens: int) -> dict:
        import queue
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        done = object()
        t0 = time.perf_counter()
        prompt = self.tok.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
        input_ids = list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        tokens: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        class Streamer:
            skipped = False

            def put(self, value: Any) -> None:
                if not self.skipped:
                    self.skipped = True  # the first call carries the prompt
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(token)

            def end(self) -> None:
                tokens.put(done)

        class Cancelled(StoppingCriteria):
            def __call__(self, *_args: Any, **_kwargs: Any) -> bool:
                return cancelled.is_set()

        kwargs = dict(
            input_ids=torch.tensor([input_ids], device=self.device),
            attention_mask=torch.ones((1, len(input_ids)), dtype=torch.long, device=self.device),
            max_new_tokens=max_tokens, do_sample=False, streamer=Streamer(),
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
            pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None
            else next(iter(self.eos), 0),
            temperature=None, top_p=None, top_k=None,
        )

        def generate() -> None:
            with torch.inference_mode():
                self.model.generate(**kwargs)

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        decode = lambda ids: self.tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        ids: list[int] = []
        prefix = read = produced = 0
        times, parts = [], []
        while True:
            token = tokens.get()
            if token is done or token in self.eos:
                break
            produced += 1
            ids.append(token)  # engines/textgen.IncrementalDecoder.push
            prefix_text = decode(ids[prefix:read])
            new_text = decode(ids[prefix:])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                prefix, read = read, len(ids)
                times.append(time.perf_counter())
                parts.append(new_text[len(prefix_text):])
        cancelled.set()
        thread.join()
        t_end = time.perf_counter()
        return _timing(t0, times, t_end, produced, "".join(parts), len(input_ids))


def _timing(t0: float, times: list[float], t_end: float, produced: int, text: str,
            prompt_tokens: int) -> dict:
    return {"ttft": times[0] - t0 if times else None,
            "decode": times[-1] - times[0] if len(times) > 1 else None,
            "total": t_end - t0, "tokens": produced, "chunks": len(times), "text": text,
            "prompt_tokens": prompt_tokens}


def direct_worker() -> None:
    """Serve load/run commands as JSON lines on stdin; answers go to the real stdout only
    (libraries' prints are sent to stderr)."""
    out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    loaded: dict[str, DirectGGUF | DirectTransformers] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "load":
                started = time.perf_counter()
                cls = DirectGGUF if cmd["format"] == "gguf" else DirectTransformers
                loaded[cmd["name"]] = cls(Path(cmd["path"]))
                answer: dict = {"ok": True, "seconds": time.perf_counter() - started}
            elif cmd["op"] == "run":
                answer = {"ok": True, **loaded[cmd["name"]].run(cmd["messages"],
                                                                cmd["max_tokens"])}
            else:
                break
        except Exception as exc:  # reported to the parent, which stops
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")


class Direct:
    """The parent's handle on the direct worker process."""

    def __init__(self, log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--direct-worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, cwd=REPO)

    def call(self, **cmd: Any) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct worker exited ({self.proc.wait()})")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise RuntimeError(f"direct worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- llmlb ------------------------------------------------------------------------------------

def start_llmlb(home: Path, port: int, n_models: int, log: Path,
                extra_env: dict[str, str] | None = None) -> Proc:
    env = clean_env(LLMLB_HOME=str(home), LLMLB_DEV="1", HF_ENDPOINT=CLOSED_ENDPOINT,
                    LLMLB_KEEP_ALIVE_SECONDS="3600", LLMLB_MAX_LOADED_MODELS=str(n_models),
                    **(extra_env or {}))
    return start_server(llmlb_serve_cmd(port), env, log, port, name="llmlb")


def server_threads(arbiter_pid: int) -> int | None:
    """OS threads of the (first) gunicorn worker: Python threads plus native ones (OpenMP)."""
    try:
        children = Path(f"/proc/{arbiter_pid}/task/{arbiter_pid}/children").read_text().split()
        return len(os.listdir(f"/proc/{children[0]}/task"))
    except (OSError, IndexError):
        return None


def via_llmlb(client: Any, model_id: str, max_tokens: int) -> dict:
    times, parts, usage = [], [], None
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                times.append(now)
                parts.append(choice.delta.content)
    t_end = time.perf_counter()
    return _timing(t0, times, t_end, usage.completion_tokens if usage else -1,
                   "".join(parts), usage.prompt_tokens if usage else -1)


def via_raw_http(port: int, model_id: str, max_tokens: int) -> dict:
    """The same request from a minimal client: one socket, HTTP/1.0 (so no chunked framing),
    SSE frames split by hand. It shows how much of the gap is the openai SDK's own CPU time,
    which on a small machine competes with the server for the same cores."""
    body = json.dumps({"model": model_id, "messages": MESSAGES, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {DEV_API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    times, parts, usage = [], [], {}
    buf, in_body = b"", False
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body)
        while data := sock.recv(65536):
            now = time.perf_counter()
            buf += data
            if not in_body:
                if b"\r\n\r\n" not in buf:
                    continue
                status, buf = buf.split(b"\r\n\r\n", 1)
                if b" 200 " not in status.split(b"\r\n", 1)[0]:
                    raise RuntimeError(f"llmlb answered {status[:200]!r}")
                in_body = True
            *frames, buf = buf.split(b"\n\n")
            for frame in frames:
                payload = frame.removeprefix(b"data: ")
                if payload == b"[DONE]":
                    continue
                chunk = json.loads(payload)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        times.append(now)
                        parts.append(choice["delta"]["content"])
    t_end = time.perf_counter()
    return _timing(t0, times, t_end, usage.get("completion_tokens", -1), "".join(parts),
                   usage.get("prompt_tokens", -1))


# --- the benchmark ----------------------------------------------------------------------------

def rates(run: dict) -> dict:
    return {"ttft_ms": run["ttft"] * 1000,
            "decode_tps": (run["chunks"] - 1) / run["decode"],
            "e2e_tps": run["tokens"] / run["total"]}


def machine() -> dict:
    import llama_cpp
    import torch
    import transformers

    return machine_info(llama_cpp_python=llama_cpp.__version__, torch=torch.__version__,
                        torch_threads=torch.get_num_threads(),
                        transformers=transformers.__version__)


def summarize(side_runs: list[dict]) -> dict:
    r = [rates(x) for x in side_runs]
    return {
        "decode_tps": statistics.median(x["decode_tps"] for x in r),
        "e2e_tps": statistics.median(x["e2e_tps"] for x in r),
        "ttft_ms": statistics.median(x["ttft_ms"] for x in r),
        "decode_tps_min": min(x["decode_tps"] for x in r),
        "decode_tps_max": max(x["decode_tps"] for x in r),
        "ttft_ms_min": min(x["ttft_ms"] for x in r),
        "ttft_ms_max": max(x["ttft_ms"] for x in r),
        "tokens": sorted({x["tokens"] for x in side_runs}),
        "chunks": sorted({x["chunks"] for x in side_runs}),
        "prompt_tokens": sorted({x["prompt_tokens"] for x in side_runs}),
        "foreign_cpu_max": max(x["foreign_cpu"] for x in side_runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=6,
                        help="measured runs per side and model (best a multiple of the sides)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs per side first")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help=f"comma-separated, some of {', '.join(ALL_MODELS)}")
    parser.add_argument("--llmlb-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the llmlb server (diagnostics, e.g. "
                             "LLMLB_THREADS=1); repeatable")
    add_quiet_args(parser, wait_help=WAIT_QUIET_OTHERS_HELP,
                   foreign_help="a direct/llmlb pair during which other processes used more "
                                "than this share of the cores is measured again")
    parser.add_argument("--retries", type=int, default=4,
                        help="how often a disturbed pair is measured again at most")
    parser.add_argument("--no-raw", action="store_true",
                        help="skip the third side, llmlb read by a minimal HTTP client")
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        direct_worker()
        return

    import openai

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(wanted) - set(ALL_MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    server_env = dict(item.split("=", 1) for item in args.llmlb_env)
    info = machine()
    built = build_models([m.removeprefix("gguf-") for m in wanted if m.startswith("gguf-")])
    models = {m: built[m] for m in wanted}
    run_dir = WORK_ROOT / "engine_overhead"
    shutil.rmtree(run_dir, ignore_errors=True)
    home = run_dir / "home"
    home.mkdir(parents=True)
    ids = install_models(home, models)
    port = free_port()
    server = start_llmlb(home, port, len(models), run_dir / "server.log", server_env)
    # One direct worker per model: each library alone in its process, as a user calling it
    # directly would have it (llmlb, by design, holds every model in one process).
    directs = {name: Direct(run_dir / f"direct-{name}.log") for name in models}
    monitor = CpuMonitor()
    retried = 0
    disturbed_kept = {name: 0 for name in models}
    sides = ("direct", "llmlb") + (() if args.no_raw else ("raw",))
    runs: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in sides} for m in models}
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=DEV_API_KEY,
                               max_retries=0, timeout=600)

        def measure(name: str, side: str) -> dict:
            monitor.start()
            if side == "direct":
                run = directs[name].call(op="run", name=name, messages=MESSAGES,
                                         max_tokens=args.max_tokens)
            elif side == "llmlb":
                run = via_llmlb(client, ids[name], args.max_tokens)
            else:
                run = via_raw_http(port, ids[name], args.max_tokens)
            run["foreign_cpu"] = monitor.foreign()
            return run

        for name, (fmt, _) in models.items():
            t = time.perf_counter()
            via_llmlb(client, ids[name], args.max_tokens)  # loads the model in the server
            server_load = time.perf_counter() - t
            # The very files llmlb serves: a GGUF is mmapped, so both processes share its page
            # cache pages (and whatever huge pages the kernel gave them).
            served = home / "models" / ids[name]
            served = served / "model.gguf" if fmt == "gguf" else served
            loaded = directs[name].call(op="load", name=name, format=fmt, path=str(served))
            print(f"{name}: first llmlb request (load + generate) {server_load:.1f}s, "
                  f"direct load {loaded['seconds']:.1f}s", flush=True)
            for _ in range(args.warmup):
                for side in sides:
                    measure(name, side)
        info["busy_before"] = wait_quiet(args.wait_quiet)
        for rep in range(args.reps):
            for name in models:
                # Rotate, so that every side comes first (right after another model ran, with
                # cold caches) equally often.
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for attempt in range(args.retries + 1):
                    pair = {side: measure(name, side) for side in order}
                    foreign = max(r["foreign_cpu"] for r in pair.values())
                    if foreign <= args.max_foreign:
                        break
                    if attempt == args.retries:
                        disturbed_kept[name] += 1
                        print(f"  rep {rep + 1} {name}: still disturbed ({foreign:.0%} of the "
                              "cores used by other processes); kept", flush=True)
                        break
                    retried += 1
                    print(f"  rep {rep + 1} {name}: disturbed ({foreign:.0%} of the cores used "
                          "by other processes); measuring again", flush=True)
                    wait_quiet(60)
                for side in order:
                    runs[name][side].append(pair[side])
                now = {side: rates(pair[side]) for side in sides}
                print(f"  rep {rep + 1}/{args.reps} {name:12s} decode tok/s "
                      + " ".join(f"{side} {r['decode_tps']:6.1f}" for side, r in now.items())
                      + "   TTFT ms "
                      + " ".join(f"{side} {r['ttft_ms']:5.1f}" for side, r in now.items())
                      + f"   other load {foreign:3.0%}", flush=True)
        info["server_threads_end"] = server_threads(server.pid)
    finally:
        for direct in directs.values():
            direct.close()
        server.stop(timeout=30)

    results: dict[str, dict] = {}
    for name, by_side in runs.items():
        r: dict[str, Any] = {"format": models[name][0]}
        for side in sides:
            r[side] = summarize(by_side[side])
        d, s = r["direct"], r["llmlb"]
        r["decode_ratio"] = s["decode_tps"] / d["decode_tps"]
        r["e2e_ratio"] = s["e2e_tps"] / d["e2e_tps"]
        r["ttft_diff_ms"] = s["ttft_ms"] - d["ttft_ms"]
        if "raw" in r:
            r["raw_decode_ratio"] = r["raw"]["decode_tps"] / d["decode_tps"]
            r["raw_ttft_diff_ms"] = r["raw"]["ttft_ms"] - d["ttft_ms"]
        r["same_output"] = len({x["text"] for v in by_side.values() for x in v}) == 1
        r["tokens_ok"] = all(r[side]["tokens"] == [args.max_tokens] for side in sides)
        r["disturbed_runs_kept"] = disturbed_kept[name]
        results[name] = r
    info["loadavg_end"] = os.getloadavg()[0]
    info["pairs_measured_again"] = retried

    print()
    print(f"llmlb vs direct, {args.reps} runs each after {args.warmup} warm-up, "
          f"max_tokens={args.max_tokens}, temperature=0, streaming; medians")
    print(f"machine: {info['cpu']}, {info['cores']} cores; llama-cpp-python "
          f"{info['llama_cpp_python']}, torch {info['torch']} ({info['torch_threads']} threads), "
          f"transformers {info['transformers']}; llmlb {info['llmlb_commit']}")
    if server_env:
        print(f"llmlb server environment added: {server_env}")
    print(f"{'model':12s} {'decode tok/s':>22s} {'ratio':>6s} {'e2e tok/s':>17s} "
          f"{'ratio':>6s} {'TTFT ms':>17s} {'diff':>7s}  checks")
    print(f"{'':12s} {'direct':>10s} {'llmlb':>11s} {'':>6s} {'direct':>8s} {'llmlb':>8s} "
          f"{'':>6s} {'direct':>8s} {'llmlb':>8s}")
    for name, r in results.items():
        d, s = r["direct"], r["llmlb"]
        checks = ["tokens ok" if r["tokens_ok"] else "TOKEN COUNT WRONG",
                  "same text" if r["same_output"] else "TEXT DIFFERS",
                  "PASS" if r["decode_ratio"] >= 0.95 else "BELOW 0.95"]
        if r["disturbed_runs_kept"]:
            checks.append(f"{r['disturbed_runs_kept']} disturbed runs kept")
        print(f"{name:12s} {d['decode_tps']:10.1f} {s['decode_tps']:11.1f} "
              f"{r['decode_ratio']:6.3f} {d['e2e_tps']:8.1f} {s['e2e_tps']:8.1f} "
              f"{r['e2e_ratio']:6.3f} {d['ttft_ms']:8.1f} {s['ttft_ms']:8.1f} "
              f"{r['ttft_diff_ms']:+7.1f}  {', '.join(checks)}")
    if "raw" in sides:
        print("llmlb with a minimal HTTP client instead of the openai SDK (client CPU excluded "
              "as far as possible):")
        for name, r in results.items():
            raw = r["raw"]
            print(f"{name:12s} decode tok/s {raw['decode_tps']:7.1f}  ratio "
                  f"{r['raw_decode_ratio']:.3f}   TTFT ms {raw['ttft_ms']:6.1f}  diff "
                  f"{r['raw_ttft_diff_ms']:+6.1f}")
    print(f"other processes: {info['busy_before']:.0%} of the cores busy before the measured "
          f"runs; {retried} disturbed pairs measured again; load average "
          f"{info['loadavg_start']:.2f} -> {info['loadavg_end']:.2f}; llmlb worker OS threads at "
          f"the end: {info.get('server_threads_end')}")
    summary = {"bench": "engine_overhead", "max_tokens": args.max_tokens, "reps": args.reps,
               "warmup": args.warmup, "llmlb_env": server_env, "machine": info,
               "results": results}
    save_summary("engine_overhead", summary, indent=2, separators=(",", ":"))


if __name__ == "__main__":
    main()

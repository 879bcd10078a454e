"""Structured outputs: decoding speed with a ``json_schema`` constraint ÷ without (goal ≥ 0.8).

For the ~63M-parameter random Llama of ``engine_overhead.py`` (GGUF f16 and safetensors), a
real ``llmlb serve`` process streams ``/v1/chat/completions`` (greedy, ``max_tokens=N``)
through the official ``openai`` SDK, alternately

* **free**: no constraint, and
* **schema**: ``response_format={"type": "json_schema", …}`` with a schema that leaves the
  model room to write N tokens (an object holding an array of free strings), so both sides
  generate the same number of tokens: llguidance computes a token mask every step, the
  engine bans the rest (logit −inf) before sampling.

Figure per model, medians over the repetitions: decode tok/s = (tokens − 1) / (last chunk −
first chunk), and the ratio schema ÷ free. Tokens are ``usage.completion_tokens``. The first
request of each side is a warm-up (it builds llguidance's tokenizer, ~1 s, once per model).

Run: ``.venv/bin/python bench/json_schema.py [--reps 5] [--max-tokens 128]``; the last line
printed is the JSON summary, also saved under ``bench/.work/results/``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import (
    DEV_API_KEY,
    WORK_ROOT,
    clean_env,
    free_port,
    llmlb_serve_cmd,
    machine_info,
    save_summary,
    start_server,
)
from engine_overhead import MESSAGES, build_models, install_models

SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
    "required": ["notes"],
}


def one_run(client, model: str, max_tokens: int, constrained: bool) -> tuple[float, int]:  # noqa: ANN001
    extra = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "notes", "schema": SCHEMA}}} if constrained else {}
    times = []
    usage = None
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            max_tokens=max_tokens, temperature=0,
                                            stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else 0
    if len(times) < 2 or tokens < 2:
        return 0.0, tokens
    return (tokens - 1) / (times[-1] - times[0]), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    import openai

    models = build_models(["f16"])
    home = WORK_ROOT / "json_schema-home"
    shutil.rmtree(home, ignore_errors=True)
    ids = install_models(home, models)
    port = free_port()
    env = clean_env(LLMLB_HOME=str(home), LLMLB_DEV="1", LLMLB_LOG_LEVEL="WARNING")
    server = start_server(llmlb_serve_cmd(port), env, Path(home / "server.log"), port)
    summary: dict = {"bench": "json_schema", **machine_info(), "max_tokens": args.max_tokens,
                     "reps": args.reps, "models": {}}
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=DEV_API_KEY,
                               max_retries=0, timeout=600)
        for name, model in ids.items():
            for constrained in (False, True):  # warm-up: load, llguidance's tokenizer
                one_run(client, model, 8, constrained)
            rates: dict[str, list[float]] = {"free": [], "schema": []}
            tokens: dict[str, list[int]] = {"free": [], "schema": []}
            for rep in range(args.reps):
                order = (False, True) if rep % 2 == 0 else (True, False)
                for constrained in order:
                    side = "schema" if constrained else "free"
                    rate, n = one_run(client, model, args.max_tokens, constrained)
                    rates[side].append(rate)
                    tokens[side].append(n)
            free, schema = statistics.median(rates["free"]), statistics.median(rates["schema"])
            ratio = schema / free if free else 0.0
            summary["models"][name] = {"free_tok_s": round(free, 1),
                                       "schema_tok_s": round(schema, 1),
                                       "ratio": round(ratio, 3),
                                       "tokens_free": tokens["free"],
                                       "tokens_schema": tokens["schema"]}
            print(f"{name:12s} free {free:7.1f} tok/s   schema {schema:7.1f} tok/s   "
                  f"ratio {ratio:.2f} (goal >= 0.8)", flush=True)
    finally:
        server.stop()
    save_summary("json_schema", summary, indent=2)


if __name__ == "__main__":
    main()

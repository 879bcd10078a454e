"""Structured outputs: decoding speed with a ``json_schema`` constraint ÷ without (goal ≥ 0.8).

For the ~63M-parameter random Llama of ``engine_overhead.py`` (GGUF f16 and safetensors), a
real ``llmlb serve`` process streams ``/v1/chat/completions`` (greedy, ``max_tokens=N``)
through the official ``openai`` SDK, alternately

* **free**: no constraint, and
* **schema**: ``response_format={"type": "json_schema", …}`` with a schema that makes the
  model write more than N tokens (an object holding a string of at least 2000 characters),
  so both sides generate exactly N tokens: llguidance computes a token mask every step, the
  engine bans the rest (logit −inf) before sampling.

Figures per model, medians over the repetitions: decode tok/s = (tokens − 1) / (last chunk −
first chunk), and the ratio schema ÷ free; then, measured in this process with the model's
vocabulary, what one constrained step costs the engine (llguidance's mask, the ban, the
token consumed) and the ratio that cost alone allows at the free speed — on a busy machine
the end-to-end ratio is mostly noise, the step cost is not. Tokens are ``usage.completion_tokens``. The first
request of each side is a warm-up (it builds llguidance's tokenizer, ~1 s, once per model).

Run: ``.venv/bin/python bench/json_schema.py [--reps 5] [--max-tokens 128]``; the last line
printed is the JSON summary, also saved under ``bench/.work/results/``.
"""

from __future__ import annotations

import argparse
import json
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

# A string the model must keep writing past max_tokens: both sides generate exactly N tokens.
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
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


def grammar_step_cost(fmt: str, path: Path, steps: int = 300) -> float:
    """Seconds one constrained sampling step adds in the engine (mask, ban, consume), in this
    process with the model's own vocabulary: the part of the ratio that does not depend on
    how busy the machine is."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engines.base import SamplingParams
    from engines.grammar import GrammarCompiler
    from engines.logit_rules import LogitRules

    if fmt == "gguf":
        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        compiler = GrammarCompiler(lambda: lltokenizer_from_vocab(llm._model.vocab))
        n_vocab = llm.n_vocab()
    else:
        from llguidance.hf import from_tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        compiler = GrammarCompiler(lambda: from_tokenizer(tok))
        n_vocab = len(tok)
    schema = json.dumps(SCHEMA)
    rules = LogitRules(SamplingParams(temperature=0, json_schema=schema), [1],
                       compiler.matcher(schema))
    rng = np.random.default_rng(0)
    spent = 0.0
    for _ in range(steps):
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        started = time.perf_counter()
        rules.apply(logits)
        rules.accept(int(np.argmax(logits)))
        spent += time.perf_counter() - started
    return spent / steps


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
            step = grammar_step_cost(*models[name])
            # the ratio the step cost alone allows at the free side's speed
            bound = 1 / (1 + step * free) if free else 0.0
            summary["models"][name] = {"free_tok_s": round(free, 1),
                                       "schema_tok_s": round(schema, 1),
                                       "ratio": round(ratio, 3),
                                       "grammar_step_us": round(step * 1e6, 1),
                                       "ratio_from_step_cost": round(bound, 3),
                                       "tokens_free": tokens["free"],
                                       "tokens_schema": tokens["schema"]}
            print(f"{name:12s} free {free:7.1f} tok/s   schema {schema:7.1f} tok/s   "
                  f"ratio {ratio:.2f} (goal >= 0.8); grammar step {step * 1e6:.0f} us "
                  f"-> ratio {bound:.3f} from its cost alone", flush=True)
    finally:
        server.stop()
    save_summary("json_schema", summary, indent=2)


if __name__ == "__main__":
    main()

"""Many users on one model (issue 10): concurrent requests to a GGUF or safetensors model are
decoded together in one batch, give exactly what they give alone, and leave it the moment
their client does; ONNX models take one call at a time."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from .conftest import HELLO, LiveServer, install

BATCHING = ["gguf", "safetensors"]
MODEL_DIRS = {"gguf": "llama-gguf", "safetensors": "llama-st", "onnx": "llama-onnx"}
DEV = {"Authorization": "Bearer sk_debug"}
PROMPTS = [[{"role": "user", "content": f"Tell story number {i} about a fox in Paris."}]
           for i in range(8)]


@pytest.fixture
def batching_server(make_server) -> LiveServer:
    return make_server(parallel_sequences=8)


class HeldStream:
    """A stream as long as the context allows, of which only the first event was read."""

    def __init__(self, server: LiveServer, model: str, messages: list[dict]) -> None:
        self.response = requests.post(
            f"{server.url}/v1/chat/completions", stream=True, timeout=120, headers=DEV,
            json={"model": model, "messages": messages, "stream": True, "temperature": 0})
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()  # dropping this iterator would disconnect
        next(self.lines)

    def close(self) -> None:
        """The client goes away."""
        self.response.close()


def hold_slots(server: LiveServer, model: str, count: int) -> list[HeldStream]:
    return [HeldStream(server, model, p) for p in PROMPTS[:count]]


def wait_for(predicate, timeout: float = 60) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def engines_state(server: LiveServer) -> dict:
    return requests.get(f"{server.url}/v0/engines", headers=DEV, timeout=30).json()


def loaded(server: LiveServer, model: str) -> dict:
    return next(m for m in engines_state(server)["loaded"] if m["id"] == model)


def stream_chat(server: LiveServer, model: str, messages: list[dict], out: dict,
                barrier: threading.Barrier | None = None, **kwargs) -> None:
    """Stream one chat, recording its text, usage, finish reason and timings in ``out``."""
    try:
        client = server.client()
        if barrier is not None:
            barrier.wait()
        out["sent"] = time.monotonic()
        pieces = []
        for chunk in client.chat.completions.create(
                model=model, messages=messages, stream=True,
                stream_options={"include_usage": True}, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                out.setdefault("first", time.monotonic())
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                out["finish"] = chunk.choices[0].finish_reason
            if chunk.usage:
                out["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        out["text"] = "".join(pieces)
        out["end"] = time.monotonic()
    except Exception as exc:  # surfaced by the test's assertions
        out["error"] = exc


def run_together(server: LiveServer, model: str, calls: list[tuple[list[dict], dict]],
                 ) -> list[dict]:
    results: list[dict] = [{} for _ in calls]
    barrier = threading.Barrier(len(calls))
    threads = [threading.Thread(target=stream_chat, args=(server, model, messages, results[i],
                                                          barrier), kwargs=kwargs)
               for i, (messages, kwargs) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    return results


def run_alone(server: LiveServer, model: str, messages: list[dict], **kwargs) -> dict:
    out: dict = {}
    stream_chat(server, model, messages, out, **kwargs)
    assert "error" not in out, out["error"]
    return out


@pytest.mark.parametrize("fmt", BATCHING)
def test_eight_streams_batch_and_match_serial(batching_server: LiveServer,
                                              tiny: dict[str, Path], fmt: str) -> None:
    model = install(batching_server, tiny, MODEL_DIRS[fmt], f"tiny-{fmt}")
    # Long enough that no client thread can start after another one's stream is over.
    serial = [run_alone(batching_server, model, p, max_tokens=200, temperature=0)
              for p in PROMPTS]
    together = run_together(batching_server, model,
                            [(p, {"max_tokens": 200, "temperature": 0}) for p in PROMPTS])
    assert [r["text"] for r in together] == [r["text"] for r in serial]
    assert [r["usage"] for r in together] == [r["usage"] for r in serial]
    assert all(r["usage"][1] == 200 and r["finish"] == "length" for r in together)
    # Nobody waits for the others: every stream has its first token before any one ends.
    assert max(r["first"] for r in together) < min(r["end"] for r in together)


@pytest.mark.parametrize("fmt", BATCHING)
def test_stops_max_tokens_and_seeds_per_sequence(batching_server: LiveServer,
                                                 tiny: dict[str, Path], fmt: str) -> None:
    model = install(batching_server, tiny, MODEL_DIRS[fmt], f"tiny-{fmt}")
    full = run_alone(batching_server, model, HELLO, max_tokens=30, temperature=0)["text"]
    stop = full[8:11]
    calls = [
        (HELLO, {"max_tokens": 30, "temperature": 0, "stop": [stop]}),
        (HELLO, {"max_tokens": 7, "temperature": 0}),
        (HELLO, {"max_tokens": 30, "temperature": 0}),
        (HELLO, {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 11}),
        (HELLO, {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 12}),
        (PROMPTS[3], {"max_tokens": 3, "temperature": 0}),
    ]
    alone = [run_alone(batching_server, model, m, **kw) for m, kw in calls]
    together = run_together(batching_server, model, calls)
    for a, b in zip(alone, together, strict=True):
        assert (b["text"], b["usage"], b["finish"]) == (a["text"], a["usage"], a["finish"])
    assert together[0]["text"] == full[: full.index(stop)] and together[0]["finish"] == "stop"
    assert together[1]["usage"][1] == 7 and together[1]["finish"] == "length"
    assert together[3]["text"] != together[4]["text"]  # each sequence has its own seed


@pytest.mark.parametrize("fmt", BATCHING)
def test_a_client_that_leaves_frees_its_slot_at_once(make_server, long_models: dict[str, Path],
                                                     fmt: str) -> None:
    # Streams of 16k tokens: the abandoned one would take a minute or more to finish.
    server = make_server(parallel_sequences=8, context_length=16384)
    model = install(server, long_models, fmt, f"long-{fmt}")
    run_alone(server, model, HELLO, max_tokens=1)  # loaded before the clock starts
    streams = hold_slots(server, model, 8)  # eight long streams take every slot
    ninth: dict = {}
    waiter = threading.Thread(target=stream_chat, args=(server, model, HELLO, ninth),
                              kwargs={"max_tokens": 4})
    waiter.start()
    assert wait_for(lambda: loaded(server, model)["waiting"] == 1)  # a ninth waits
    left = time.monotonic()
    streams[0].close()  # one client goes away mid-stream
    waiter.join(timeout=300)
    assert ninth.get("usage", (0, 0))[1] == 4, ninth
    # Served at once, while the seven others still generate; not after the abandoned answer
    # would have been finished.
    assert ninth["end"] - left < 10
    assert loaded(server, model)["active"] >= 1
    for r in streams[1:]:
        r.close()
    assert wait_for(lambda: loaded(server, model)["active"] == 0)


@pytest.mark.parametrize("fmt", BATCHING)
def test_a_whole_answer_stops_when_its_client_leaves(make_server, long_models: dict[str, Path],
                                                     fmt: str) -> None:
    # Greedy, the 16k model writes until the context is full: a minute or more of work that
    # nobody reads once the client has gone.
    server = make_server(parallel_sequences=2, context_length=16384)
    model = install(server, long_models, fmt, f"long-{fmt}")
    run_alone(server, model, HELLO, max_tokens=1)  # loaded before the clock starts
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]),
                                      timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={**DEV, "Content-Type":
                                                          "application/json"},
                 body=json.dumps({"model": model, "messages": HELLO, "temperature": 0}))
    assert wait_for(lambda: loaded(server, model)["active"] == 1)
    time.sleep(0.5)  # well into its generation
    conn.close()  # the client gives up before the answer
    # The slot is free in moments, not when the context is full.
    assert wait_for(lambda: loaded(server, model)["active"] == 0, timeout=15)
    run_alone(server, model, HELLO, max_tokens=2)  # and the model serves the next one


def test_queue_full_is_503_with_retry_after(make_server, long_models: dict[str, Path]) -> None:
    server = make_server(parallel_sequences=2, max_queued_requests=1)
    model = install(server, long_models, "gguf", "long")
    run_alone(server, model, HELLO, max_tokens=1)
    streams = hold_slots(server, model, 2)
    third: dict = {}
    waiter = threading.Thread(target=stream_chat, args=(server, model, HELLO, third),
                              kwargs={"max_tokens": 2})
    waiter.start()
    assert wait_for(lambda: loaded(server, model)["waiting"] == 1)
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 503 and info.value.body["code"] == "model_busy"
    assert int(info.value.response.headers["Retry-After"]) > 0
    for r in streams:
        r.close()
    waiter.join(timeout=120)
    assert third.get("usage", (0, 0))[1] == 2


def test_no_queue_serves_free_slots_and_refuses_the_rest(make_server,
                                                          long_models: dict[str, Path]) -> None:
    server = make_server(parallel_sequences=2, max_queued_requests=0)
    model = install(server, long_models, "gguf", "long")
    run_alone(server, model, HELLO, max_tokens=1)  # a free slot serves: no queue is needed
    streams = hold_slots(server, model, 2)
    with pytest.raises(openai.APIStatusError) as info:
        server.client().chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 503 and info.value.body["code"] == "model_busy"
    for r in streams:
        r.close()
    assert wait_for(lambda: loaded(server, model)["active"] == 0)
    run_alone(server, model, HELLO, max_tokens=1)


def test_embeddings_unaffected_while_a_batch_runs(batching_server: LiveServer,
                                                  tiny: dict[str, Path]) -> None:
    model = install(batching_server, tiny, "llama-gguf", "tiny")
    embedder = install(batching_server, tiny, "bert-embed", "embed")
    client = batching_server.client()
    alone = client.embeddings.create(model=embedder, input=["a lazy dog", "the quick fox"])
    results: list[dict] = [{} for _ in PROMPTS]
    threads = [threading.Thread(target=stream_chat, args=(batching_server, model, p, out),
                                kwargs={"max_tokens": 100, "temperature": 0})
               for p, out in zip(PROMPTS, results, strict=True)]
    for t in threads:
        t.start()
    during = client.embeddings.create(model=embedder, input=["a lazy dog", "the quick fox"])
    for t in threads:
        t.join(timeout=300)
    for a, b in zip(alone.data, during.data, strict=True):
        assert b.embedding == pytest.approx(a.embedding, abs=1e-6)
    assert during.usage.prompt_tokens == alone.usage.prompt_tokens
    assert all(r.get("usage", (0, 0))[1] == 100 for r in results)


def test_engines_say_how_many_sequences_they_batch(make_server, tiny: dict[str, Path]) -> None:
    batching_server = make_server(parallel_sequences=8, max_loaded_models=3)
    ids = {fmt: install(batching_server, tiny, MODEL_DIRS[fmt], f"tiny-{fmt}")
           for fmt in MODEL_DIRS}
    for model in ids.values():
        run_alone(batching_server, model, HELLO, max_tokens=1)
    state = engines_state(batching_server)
    active = {e["format"]: e for e in state["engines"] if e["active"]}
    assert (active["gguf"]["parallel"], active["safetensors"]["parallel"],
            active["onnx"]["parallel"]) == (8, 8, 1)
    assert active["metal"]["parallel"] is None  # unavailable here
    by_id = {m["id"]: m for m in state["loaded"]}
    assert [by_id[ids[f]]["parallel"] for f in ("gguf", "safetensors", "onnx")] == [8, 8, 1]


def test_by_default_each_model_gets_the_sequences_its_kv_cache_fits(
        make_server, tiny: dict[str, Path]) -> None:
    server = make_server(max_loaded_models=3)  # no LLMLB_PARALLEL_SEQUENCES
    ids = {fmt: install(server, tiny, MODEL_DIRS[fmt], f"tiny-{fmt}") for fmt in MODEL_DIRS}
    for model in ids.values():
        run_alone(server, model, HELLO, max_tokens=1)
    state = engines_state(server)
    active = {e["format"]: e for e in state["engines"] if e["active"]}
    assert [(active[f]["parallel"], active[f]["parallel_auto"]) for f in MODEL_DIRS] == \
        [(8, True), (8, True), (1, False)]
    # The tiny Llama: 2 layers x 2 KV heads x 16 wide, keys and values, 512 tokens of
    # context; f16 in llama.cpp, float32 in torch on the CPU. Its cache is tiny: all 8 fit.
    per_token = 2 * 2 * 16 * 2
    by_id = {m["id"]: m for m in state["loaded"]}
    assert [(by_id[ids[f]]["parallel"], by_id[ids[f]]["parallel_auto"],
             by_id[ids[f]]["kv_cache_bytes"]) for f in MODEL_DIRS] == [
        (8, True, per_token * 2 * 512 * 8), (8, True, per_token * 4 * 512 * 8),
        (1, False, None)]
    # What a node tells its balancer says the same (the report of the in-process node).
    report = server.runtime.cluster.local.report().to_json()
    assert [(m["parallel"], m["parallel_auto"], m["kv_cache_bytes"]) for m in report["loaded"]] \
        == [(by_id[m["id"]]["parallel"], by_id[m["id"]]["parallel_auto"],
             by_id[m["id"]]["kv_cache_bytes"]) for m in report["loaded"]]
    assert report["load_options"] == {"context_length": 4096, "parallel_sequences": None}
    # Eight streams at once are decoded together: none waits for a slot.
    model = ids["gguf"]
    results = run_together(server, model, [(p, {"max_tokens": 50, "temperature": 0})
                                           for p in PROMPTS])
    assert max(r["first"] for r in results) < min(r["end"] for r in results)


def test_fewer_sequences_when_memory_is_short() -> None:
    from engines.base import LoadOptions, choose_parallel

    mib = 2**20
    auto = LoadOptions(free_memory_bytes=1000 * mib)
    # Half of what the weights leave free goes to the KV cache.
    assert choose_parallel(auto, 400 * mib, 30 * mib, 64) == 8  # room for 10: 8 at most
    assert choose_parallel(auto, 400 * mib, 100 * mib, 64) == 3
    assert choose_parallel(auto, 900 * mib, 100 * mib, 64) == 1  # never fewer than one
    assert choose_parallel(LoadOptions(), 400 * mib, 30 * mib, 64) == 4  # memory unknown
    assert choose_parallel(LoadOptions(parallel_sequences=16, free_memory_bytes=mib),
                           400 * mib, 100 * mib, 64) == 16  # the setting wins

"""Real generation through the openai SDK for every engine (GGUF, safetensors, ONNX), with
tiny random-weight models built on the spot, and the loaded-model rules of EN-4."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import openai
import pytest
import requests

from .conftest import HELLO, LiveServer, install
from .tinymodels import make_llama_safetensors

FORMATS = ["gguf", "safetensors", "onnx"]
MODEL_DIRS = {"gguf": "llama-gguf", "safetensors": "llama-st", "onnx": "llama-onnx"}


@pytest.fixture
def models(server: LiveServer, tiny: dict[str, Path]) -> dict[str, str]:
    """One tiny llama per format plus the BERT embedder, installed in the server's models."""
    ids = {fmt: install(server, tiny, MODEL_DIRS[fmt], f"tiny-{fmt}") for fmt in FORMATS}
    ids["embed"] = install(server, tiny, "bert-embed", "tiny-bert")
    return ids


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_completion(server: LiveServer, models: dict[str, str], fmt: str) -> None:
    reply = server.client().chat.completions.create(model=models[fmt], messages=HELLO,
                                                    max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == models[fmt]
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_the_three_engines_agree(server: LiveServer, models: dict[str, str]) -> None:
    """The same weights in three formats give the same greedy text: real inference."""
    client = server.client()
    texts = {fmt: client.chat.completions.create(model=models[fmt], messages=HELLO,
                                                 max_tokens=10, temperature=0)
             .choices[0].message.content for fmt in FORMATS}
    assert texts["gguf"] == texts["safetensors"] == texts["onnx"], texts
    prompts = {fmt: client.chat.completions.create(model=models[fmt], messages=HELLO,
                                                   max_tokens=1).usage.prompt_tokens
               for fmt in FORMATS}
    assert len(set(prompts.values())) == 1, prompts


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming(server: LiveServer, models: dict[str, str], long_models: dict[str, Path],
                   fmt: str) -> None:
    stream = server.client().chat.completions.create(
        model=models[fmt], messages=HELLO, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) >= 20  # token by token
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 40
    whole = server.client().chat.completions.create(model=models[fmt], messages=HELLO,
                                                    max_tokens=40, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    # Tokens leave as they are made, not in one blob at the end: on a generation of
    # seconds, the first arrives long before the last.
    model = install(server, long_models, fmt, f"long-{fmt}")
    server.client().chat.completions.create(model=model, messages=HELLO, max_tokens=1)
    sent = time.monotonic()
    arrivals = [time.monotonic() for chunk in server.client().chat.completions.create(
        model=model, messages=HELLO, max_tokens=1000, temperature=0, stream=True)
        if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) > 900
    assert arrivals[0] - sent < (arrivals[-1] - sent) / 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_sse_ends_with_done(server: LiveServer, models: dict[str, str], fmt: str) -> None:
    r = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=60,
                      headers={"Authorization": "Bearer sk_debug"},
                      json={"model": models[fmt], "messages": HELLO, "max_tokens": 5,
                            "stream": True})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-Accel-Buffering"] == "no"
    lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in first  # only with stream_options.include_usage


@pytest.mark.parametrize("fmt", FORMATS)
def test_stop_sequences(server: LiveServer, models: dict[str, str], fmt: str) -> None:
    client = server.client()
    full = client.chat.completions.create(model=models[fmt], messages=HELLO, max_tokens=30,
                                          temperature=0).choices[0].message.content
    stop = full[8:11]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                           .create(model=models[fmt], messages=HELLO, max_tokens=30,
                                   temperature=0, stop=[stop, "\x00never"], stream=True)
                           if c.choices)
        else:
            reply = client.chat.completions.create(model=models[fmt], messages=HELLO,
                                                   max_tokens=30, temperature=0, stop=stop)
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.completion_tokens < 30
            text = reply.choices[0].message.content
        assert text == cut


@pytest.mark.parametrize("fmt", FORMATS)
def test_seed_reproducibility(server: LiveServer, models: dict[str, str], fmt: str) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=models[fmt], messages=HELLO, max_tokens=20, temperature=1.0, top_p=0.9,
            seed=seed).choices[0].message.content

    assert sample(42) == sample(42)
    assert len({sample(1), sample(2), sample(3)}) > 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_completion(server: LiveServer, models: dict[str, str], fmt: str) -> None:
    client = server.client()
    reply = client.completions.create(model=models[fmt], prompt="The quick brown fox",
                                      max_tokens=8, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=models[fmt], prompt="The quick brown fox", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert streamed == reply.choices[0].text
    # Greedy: sampled at temperature 1, the random tiny model may pick its end token early.
    default = client.completions.create(model=models[fmt], prompt="The quick brown fox",
                                        temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_embeddings(server: LiveServer, models: dict[str, str]) -> None:
    client = server.client()
    result = client.embeddings.create(model=models["embed"],
                                      input=["the quick brown fox", "a lazy dog",
                                             "the quick brown fox"])
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert len(vectors[0]) == 32
    for v in vectors:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-4  # L2-normalised
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-6)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert result.usage.prompt_tokens > 6
    as_float = client.embeddings.create(model=models["embed"], input="a lazy dog",
                                        encoding_format="float").data[0].embedding
    assert as_float == pytest.approx(vectors[1], abs=1e-6)


def test_wrong_operation_for_a_model(server: LiveServer, models: dict[str, str]) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=models["gguf"], input="hi")
    assert info.value.body["code"] == "unsupported_operation"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=models["embed"], messages=HELLO)
    assert "does not support chat completions" in info.value.body["message"]


def test_prompt_longer_than_the_context(server: LiveServer, models: dict[str, str]) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    for fmt in FORMATS:
        with pytest.raises(openai.BadRequestError) as info:
            server.client().chat.completions.create(model=models[fmt], messages=long,
                                                    stream=True)
        assert info.value.body["code"] == "context_length_exceeded"
        assert "context" in info.value.body["message"]
        assert "tokens > 512 maximum" in info.value.body["message"]  # both numbers


def test_metal_model_gets_a_clear_error(server: LiveServer) -> None:
    (server.models_dir / "mac-only").mkdir()
    (server.models_dir / "mac-only" / "model.metal.bin").write_bytes(b"\0" * 64)
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="mac-only", messages=HELLO)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "engine_unavailable"
    assert "Metal needs macOS on Apple Silicon" in info.value.body["message"]


def test_corrupt_model_is_a_clear_error(server: LiveServer) -> None:
    (server.models_dir / "broken").mkdir()
    (server.models_dir / "broken" / "model.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model="broken", messages=HELLO)
    assert info.value.body["code"] == "model_load_failed"


def test_engines_listing(server: LiveServer) -> None:
    engines = requests.get(f"{server.url}/v0/engines", timeout=30,
                           headers={"Authorization": "Bearer sk_debug"}).json()["engines"]
    by_format = {e["format"]: e for e in engines if e["active"]}
    assert by_format["gguf"]["name"] == "llama.cpp" and by_format["gguf"]["available"]
    assert by_format["safetensors"]["name"] == "transformers"
    assert by_format["onnx"]["name"] == "onnxruntime"
    assert by_format["metal"]["available"] is False and by_format["metal"]["reason"]


# --- loaded models (EN-4) -----------------------------------------------------------------

def loaded_ids(server: LiveServer) -> list[str]:
    return [m["id"] for m in requests.get(f"{server.url}/v0/engines", timeout=30, headers={
        "Authorization": "Bearer sk_debug"}).json()["loaded"]]


def test_idle_models_are_unloaded(make_server, tiny: dict[str, Path]) -> None:
    server = make_server(keep_alive_seconds=1)
    model = install(server, tiny, "llama-gguf", "idle")
    server.client().chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    assert loaded_ids(server) == ["idle"]
    deadline = time.monotonic() + 10
    while loaded_ids(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert loaded_ids(server) == []


def test_at_most_max_loaded_models(make_server, tiny: dict[str, Path]) -> None:
    server = make_server(max_loaded_models=1)
    a = install(server, tiny, "llama-gguf", "a")
    b = install(server, tiny, "llama-onnx", "b")
    client = server.client()
    client.chat.completions.create(model=a, messages=HELLO, max_tokens=2)
    client.chat.completions.create(model=b, messages=HELLO, max_tokens=2)
    assert loaded_ids(server) == ["b"]
    client.chat.completions.create(model=b, messages=HELLO, max_tokens=2)
    assert loaded_ids(server) == ["b"]


def test_changed_files_are_reloaded(server: LiveServer, tiny: dict[str, Path],
                                    tmp_path: Path) -> None:
    model = install(server, tiny, "llama-st", "changing")
    client = server.client()
    before = client.chat.completions.create(model=model, messages=HELLO, max_tokens=10,
                                            temperature=0).choices[0].message.content
    other = make_llama_safetensors(tmp_path / "other", seed=7)
    shutil.copy(other / "model.safetensors", server.models_dir / model / "model.safetensors")
    after = client.chat.completions.create(model=model, messages=HELLO, max_tokens=10,
                                           temperature=0).choices[0].message.content
    assert before != after


@pytest.mark.parametrize("fmt", FORMATS)
def test_disconnected_stream_stops_its_generation(make_server, long_models: dict[str, Path],
                                                  fmt: str) -> None:
    """A client that goes away stops its generation at once: with one call at a time, the
    next request gets the model long before the abandoned answer could have been finished."""
    server = make_server(parallel_sequences=1)
    model = install(server, long_models, fmt, "long")
    client = server.client(timeout=120)
    client.chat.completions.create(model=model, messages=HELLO, max_tokens=1)
    started = time.monotonic()
    full = client.chat.completions.create(model=model, messages=HELLO, max_tokens=1500,
                                          temperature=0)
    whole = time.monotonic() - started  # what finishing the abandoned stream would take
    assert full.usage.completion_tokens == 1500
    r = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=60,
                      headers={"Authorization": "Bearer sk_debug"},
                      json={"model": model, "messages": HELLO, "max_tokens": 1500,
                            "temperature": 0, "stream": True})
    lines = r.iter_lines()
    next(lines)
    r.close()  # the client goes away mid-stream
    started = time.monotonic()
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert time.monotonic() - started < whole / 2

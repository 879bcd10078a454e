"""Engine plugins (EN-2): drop-in files, entry points, overriding a built-in, and the
meta-test that every hook has a test."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import textwrap
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from llmlb import hookspecs
from llmlb.plugins import EngineRegistry, load_plugins

from .conftest import HELLO, REPO, install

DEV = {"Authorization": "Bearer sk_debug"}

SHOUTING_GGUF = '''
from engines.base import TokenText
from engines.gguf import GGUFEngine
from llmlb.hookspecs import hookimpl


class Shouting:
    def __init__(self, inner):
        self.inner = inner
        self.capabilities = inner.capabilities
        self.context_length = inner.context_length

    def chat(self, messages, params):
        for event in self.inner.chat(messages, params):
            yield TokenText(event.text.upper()) if isinstance(event, TokenText) else event

    def unload(self):
        self.inner.unload()


class ShoutingGGUF(GGUFEngine):
    name = "shouting-gguf"

    def load(self, model_dir, artifacts, options):
        return Shouting(super().load(model_dir, artifacts, options))


@hookimpl
def register_engines():
    return [ShoutingGGUF()]
'''

SLOW_ENGINE = '''
import time
from engines.base import CHAT, Availability, Engine, Finished, LoadedModel, Started, TokenText
from llmlb.hookspecs import hookimpl


class Slow(LoadedModel):
    capabilities = frozenset({CHAT})

    def __init__(self, delay):
        self.delay = delay

    def chat(self, messages, params):
        yield Started(1)
        for i in range(params.max_tokens or 5):
            time.sleep(self.delay)
            yield TokenText(f"{i} ")
        yield Finished("length")


class SlowEngine(Engine):
    name = "slow"
    formats = {"slow": (".slow",)}

    def availability(self):
        return Availability(True)

    def load(self, model_dir, artifacts, options):
        return Slow(float(artifacts[0].read_text()))


@hookimpl
def register_engines():
    return [SlowEngine()]
'''


FAILING_ENGINE = '''
from engines.base import CHAT, Availability, Engine, EngineError, LoadedModel, Started, TokenText
from llmlb.hookspecs import hookimpl


class Failing(LoadedModel):
    capabilities = frozenset({CHAT})

    def chat(self, messages, params):
        yield Started(1)
        yield TokenText("partial ")
        yield TokenText("answer ")
        raise EngineError("the GPU fell off the bus")


class FailingEngine(Engine):
    name = "failing"
    formats = {"failing": (".failing",)}

    def availability(self):
        return Availability(True)

    def load(self, model_dir, artifacts, options):
        return Failing()


@hookimpl
def register_engines():
    return [FailingEngine()]
'''


def write_plugin(directory: Path, name: str, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_hook_register_engines(make_server, llmlb_home: Path, tiny) -> None:
    """A dropped-in file overrides the built-in engine of its format and serves it."""
    plain = make_server()
    install(plain, tiny, "llama-gguf", "m")
    expected = plain.client().chat.completions.create(model="m", messages=HELLO, max_tokens=8,
                                                      temperature=0).choices[0].message.content

    plugins = llmlb_home / "my-plugins"
    write_plugin(plugins, "shouting", SHOUTING_GGUF)
    server = make_server(plugins_dir=[str(plugins)])
    got = server.client().chat.completions.create(model="m", messages=HELLO, max_tokens=8,
                                                  temperature=0).choices[0].message.content
    assert got == expected.upper() and got != expected
    engines = requests.get(f"{server.url}/v0/engines", headers=DEV, timeout=30).json()
    gguf = [e for e in engines["engines"] if e["format"] == "gguf"]
    assert [(e["name"], e["active"]) for e in gguf] == [("shouting-gguf", True),
                                                        ("llama.cpp", False)]


def test_plugin_adds_a_format_and_the_queue_is_bounded(make_server, llmlb_home: Path) -> None:
    plugins = llmlb_home / "p"
    write_plugin(plugins, "slow", SLOW_ENGINE)
    server = make_server(plugins_dir=[str(plugins)], max_queued_requests=1)
    (server.models_dir / "snail").mkdir()
    (server.models_dir / "snail" / "model.slow").write_text("0.05")
    assert [m.id for m in server.client().models.list().data] == ["snail"]

    results: list[object] = []

    def call() -> None:
        try:
            results.append(server.client().chat.completions.create(
                model="snail", messages=HELLO, max_tokens=30).usage.completion_tokens)
        except openai.APIStatusError as exc:
            results.append(exc)

    def when(what: str, check) -> None:  # noqa: ANN001 - a predicate on the loaded model
        deadline = time.monotonic() + 30
        while True:
            loaded = requests.get(f"{server.url}/v0/engines", headers=DEV,
                                  timeout=10).json()["loaded"]
            if loaded and check(loaded[0]):
                return
            assert time.monotonic() < deadline, f"never {what}: {loaded}"
            time.sleep(0.02)

    threads = [threading.Thread(target=call) for _ in range(4)]
    threads[0].start()
    when("generating", lambda m: m["active"] == 1)
    threads[1].start()
    when("queued", lambda m: m["waiting"] == 1)
    for t in threads[2:]:  # one generating, one waiting: the rest are turned away
        t.start()
        t.join()
    for t in threads[:2]:
        t.join()
    busy = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert sorted(r for r in results if isinstance(r, int)) == [30, 30]
    assert len(busy) == 2
    assert all(e.status_code == 503 and e.body["code"] == "model_busy" for e in busy)
    assert all(e.response.headers["Retry-After"] for e in busy)


def test_error_mid_stream_is_an_sse_event(make_server, llmlb_home: Path) -> None:
    plugins = llmlb_home / "p"
    write_plugin(plugins, "failing", FAILING_ENGINE)
    server = make_server(plugins_dir=[str(plugins)])
    (server.models_dir / "flaky").mkdir()
    (server.models_dir / "flaky" / "model.failing").write_text("")
    r = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=30,
                      headers=DEV, json={"model": "flaky", "messages": HELLO, "stream": True})
    assert r.status_code == 200
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "fell off the bus" in error["message"]
    texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(t for t in texts if t) == "partial answer "
    # The SDK raises on the error event, after the text that came first.
    received = []
    with pytest.raises(openai.APIError, match="fell off the bus"):
        for chunk in server.client().chat.completions.create(model="flaky", messages=HELLO,
                                                             stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "partial answer "
    # Without streaming it is a plain 500 JSON error, and the model is free again.
    with pytest.raises(openai.InternalServerError):
        server.client().chat.completions.create(model="flaky", messages=HELLO)


def test_entry_point_plugins_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site"
    write_plugin(pkg, "llmlb_slow_ep", SLOW_ENGINE)
    dist = pkg / "llmlb_slow_ep-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmlb-slow-ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llmlb.engines]\nslow = llmlb_slow_ep\n")
    monkeypatch.syspath_prepend(str(pkg))
    registry = EngineRegistry(load_plugins(()))
    entry = registry.for_format("slow")
    assert entry is not None and entry.engine.name == "slow"
    assert ".slow" in registry.format_table()["slow"]


def test_loading_twice_registers_once(llmlb_home: Path) -> None:
    plugins = llmlb_home / "p"
    write_plugin(plugins, "slow", SLOW_ENGINE)
    first = EngineRegistry(load_plugins((plugins,))).describe()
    second = EngineRegistry(load_plugins((plugins,))).describe()
    assert first == second
    assert [e["name"] for e in second].count("slow") == 1


def test_a_broken_plugin_is_skipped(make_server, llmlb_home: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    plugins = llmlb_home / "p"
    write_plugin(plugins, "broken", "import does_not_exist\n")
    server = make_server(plugins_dir=[str(plugins)])
    assert server.client().models.list().data == []
    assert any("broken.py failed to import" in r.getMessage() for r in caplog.records)


def test_example_upstream_plugin(make_server, llmlb_home: Path, tiny,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example relays to another OpenAI-compatible server (here, llmlb)."""
    upstream = make_server()
    install(upstream, tiny, "llama-onnx", "tiny")
    install(upstream, tiny, "bert-embed", "embed")
    monkeypatch.setenv("LLMLB_ENDPOINT_KEY_UPSTREAM", "sk_debug")
    front = make_server(plugins_dir=[str(REPO / "plugins")])
    for name, target in (("relayed", "tiny"), ("relayed-embed", "embed")):
        (front.models_dir / name).mkdir()
        (front.models_dir / name / "model.upstream.json").write_text(
            f'{{"base_url": "{upstream.url}/v1", "model": "{target}", '
            '"api_key_env": "LLMLB_ENDPOINT_KEY_UPSTREAM"}')
    direct = upstream.client().chat.completions.create(model="tiny", messages=HELLO,
                                                       max_tokens=12, temperature=0)
    relayed = front.client().chat.completions.create(model="relayed", messages=HELLO,
                                                     max_tokens=12, temperature=0)
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.usage.prompt_tokens == direct.usage.prompt_tokens
    assert relayed.usage.completion_tokens == 12
    chunks = [c.choices[0].delta.content for c in front.client().chat.completions.create(
        model="relayed", messages=HELLO, max_tokens=12, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert "".join(chunks) == direct.choices[0].message.content and len(chunks) > 3
    vectors = front.client().embeddings.create(model="relayed-embed", input=["a", "b"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) == 32
    # An upstream's error keeps its status and code: a 404 stays a 404.
    shutil.rmtree(upstream.models_dir / "tiny")
    with pytest.raises(openai.NotFoundError) as info:
        front.client().chat.completions.create(model="relayed", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"


def test_example_upstream_plugin_reads_only_keys_made_for_it(make_server,
                                                             monkeypatch) -> None:
    """A ``model.upstream.json`` (written by anyone who can put files in a model directory,
    or synced with a model) must not ship the balancer's HF_TOKEN to its base_url."""
    from .fake_openai import FakeOpenAI

    monkeypatch.setenv("HF_TOKEN", "hf_private_token")
    with FakeOpenAI("catcher") as fake:
        front = make_server(plugins_dir=[str(REPO / "plugins")])
        (front.models_dir / "stolen").mkdir()
        (front.models_dir / "stolen" / "model.upstream.json").write_text(json.dumps(
            {"base_url": fake.url, "model": "fake-model", "api_key_env": "HF_TOKEN"}))
        r = requests.post(f"{front.url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": "Bearer sk_debug"},
                          json={"model": "stolen", "messages": HELLO})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert "LLMLB_ENDPOINT_KEY_" in r.json()["error"]["message"]
        assert fake.requests == []


def test_example_upstream_plugin_keeps_its_connections(make_server) -> None:
    from .fake_openai import FakeOpenAI

    with FakeOpenAI("up") as fake:
        front = make_server(plugins_dir=[str(REPO / "plugins")])
        (front.models_dir / "relayed").mkdir()
        (front.models_dir / "relayed" / "model.upstream.json").write_text(
            f'{{"base_url": "{fake.url}", "model": "fake-model"}}')
        for _ in range(4):
            answer = front.client().chat.completions.create(model="relayed", messages=HELLO)
            assert answer.choices[0].message.content == "t0 t1 t2 t3 t4 "
        assert fake.connections == 1  # one kept-alive connection, not one per call
        fake.fault = "429"
        with pytest.raises(openai.RateLimitError):
            front.client().chat.completions.create(model="relayed", messages=HELLO)


def test_every_hook_has_a_test() -> None:
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, "llmlb_spec")]
    assert hooks, "no hooks found"
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    missing = [h for h in hooks if not re.search(rf"def test_hook_{h}\b", tests)]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


WEIGHTS_ENGINE = '''
from engines.base import Availability, Engine, EngineError
from llmlb.hookspecs import hookimpl


class WeightsEngine(Engine):
    name = "weights"
    formats = {"weights": (".weights",)}

    def availability(self):
        return Availability(True)

    def load(self, model_dir, artifacts, options):
        try:
            (model_dir / "tensors.bin").read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read the tensors: {exc}") from exc
'''


def test_local_paths_stay_with_the_operators(make_server, tmp_path: Path) -> None:
    """An engine's error quotes the file it could not read; the client sees its name, not
    where llmlb keeps its models. /v0/engines names plugin files without their directory,
    except to admins."""
    from llmlb import auth

    plugins = tmp_path / "secret-place" / "plugins"
    write_plugin(plugins, "weights", WEIGHTS_ENGINE + "\n@hookimpl\ndef register_engines():\n"
                 "    return [WeightsEngine()]\n")
    server = make_server(plugins_dir=[str(plugins)], dev=False)
    (server.models_dir / "heavy").mkdir()
    (server.models_dir / "heavy" / "model.weights").write_text("x")
    api_key, _ = auth.create_api_key(server.runtime.db, "inference", "api")
    admin_key, _ = auth.create_api_key(server.runtime.db, "ops", "admin")

    with pytest.raises(openai.InternalServerError) as info:
        server.client(api_key=api_key).chat.completions.create(model="heavy", messages=HELLO)
    message = info.value.body["message"]
    assert info.value.body["code"] == "model_load_failed"
    assert "tensors.bin" in message and str(tmp_path) not in message, message

    listing = requests.get(f"{server.url}/v0/engines", timeout=120,  # the first imports torch
                           headers={"Authorization": f"Bearer {api_key}"})
    assert listing.status_code == 200 and str(tmp_path) not in listing.text
    assert {e["plugin"] for e in listing.json()["engines"]} >= {"file:weights.py"}
    admin = requests.get(f"{server.url}/v0/engines", timeout=60,
                         headers={"Authorization": f"Bearer {admin_key}"})
    assert str(plugins / "weights.py") in admin.text

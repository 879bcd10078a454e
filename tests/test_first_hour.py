"""What a new user meets in the first hour, following the README: the log tells the truth
(how long a model took to load, no llama.cpp warning about a limit llmlb enforces), a node
shows up at its balancer at once, errors name the right field, each command's --help lists
what that command takes."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import openai
import pytest

from .conftest import HELLO, free_port, install, llmlb_command
from .test_plugins import write_plugin

SLOW_TO_IMPORT = '''
import time
from engines.base import CHAT, Availability, Engine, Finished, LoadedModel, Started, TokenText
from llmlb.hookspecs import hookimpl


class Echo(LoadedModel):
    capabilities = frozenset({CHAT})

    def chat(self, messages, params):
        yield Started(1)
        yield TokenText("hi")
        yield Finished("stop")


class HeavyEngine(Engine):
    name = "heavy"
    formats = {"heavy": (".heavy",)}

    def availability(self):
        time.sleep(1.5)  # as importing torch or llama_cpp does, the first time
        return Availability(True)

    def load(self, model_dir, artifacts, options):
        return Echo()


@hookimpl
def register_engines():
    return [HeavyEngine()]
'''


def test_the_logged_load_time_is_what_the_request_waited(make_server, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "heavy", SLOW_TO_IMPORT)
    server = make_server(plugins_dir=[str(plugins)])
    (server.models_dir / "big").mkdir()
    (server.models_dir / "big" / "model.heavy").write_text("x")
    server.client().chat.completions.create(model="big", messages=HELLO)
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Model loaded successfully: big")]
    total, engine = (float(x) for x in re.search(
        r"(\d+\.\d)s: (\d+\.\d)s loading the engine", line).groups())
    assert total >= 1.5 and engine >= 1.5, line  # the engine's first check is part of it


def test_llama_cpp_has_nothing_to_warn_about(start_process, llmlb_home: Path, tiny) -> None:
    """The tiny GGUF model was trained on 512 tokens; llmlb holds every request to that, 4
    at once. llama.cpp must see that limit (no "n_ctx_seq > n_ctx_train" warning), and four
    requests that each fill the context still run together."""
    port = free_port()
    proc = start_process([*llmlb_command(), "serve", "--dev", "--port", str(port)], {}, port)
    (llmlb_home / "models" / "tiny").mkdir(parents=True)
    (llmlb_home / "models" / "tiny" / "model.gguf").write_bytes(
        tiny["llama-gguf"].read_bytes())
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="sk_debug", max_retries=0,
                           timeout=300)
    prompt = [{"role": "user", "content": "hello world " * 60}]
    usages: list = []

    def ask(i: int) -> None:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"{i} "}, *prompt],
            max_tokens=100, temperature=0)
        usages.append(reply.usage)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(usages) == 4
    assert all(u.completion_tokens == 100 and u.total_tokens > 400 for u in usages), usages
    with pytest.raises(openai.BadRequestError):  # the limit is real
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "hello world " * 200}])
    log = proc.log()
    assert "Model loaded successfully: tiny" in log
    assert "n_ctx_seq" not in log and "training context overflow" not in log


def test_a_long_completions_prompt_names_prompt(server, tiny) -> None:
    install(server, tiny, "llama-gguf", "tiny")
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tiny", prompt="hello world " * 400)
    assert info.value.body["code"] == "invalid_prompt"
    assert info.value.body["param"] == "prompt"

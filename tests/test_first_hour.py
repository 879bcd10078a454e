"""What a new user meets in the first hour, following the README: the log tells the truth
(how long a model took to load, no llama.cpp warning about a limit llmlb enforces), a node
shows up at its balancer at once, errors name the right field, each command's --help lists
what that command takes."""

from __future__ import annotations

import re
import threading
import time
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
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "prompt"


GATED_ENGINE = '''
import os
import time
from pathlib import Path
from engines.base import Availability, Engine
from llmlb.hookspecs import hookimpl


class GatedEngine(Engine):
    """An engine whose first check takes as long as the test wants (importing torch takes
    ~12 s on a small machine): it ends when the gate file appears."""

    name = "gated"
    formats = {"gated": (".gated",)}

    def availability(self):
        gate = Path(os.environ["GATE_FILE"])
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return Availability(True)

    def load(self, model_dir, artifacts, options):
        raise NotImplementedError


@hookimpl
def register_engines():
    return [GatedEngine()]
'''


def test_a_node_registers_before_its_engines_are_checked(start_process, tmp_path: Path
                                                         ) -> None:
    """`llmlb node` is at its balancer (and says so) while its engines' first checks still
    run; their rows come with the next heartbeat."""
    import requests

    from llmlb.auth import create_api_key
    from llmlb.state import open_database

    home = tmp_path / "balancer"
    db = open_database(home / "llmlb.db")
    admin, _ = create_api_key(db, "admin", "admin")
    node_key, _ = create_api_key(db, "nodes", "node")
    db.close()
    port = free_port()
    balancer = start_process(
        [*llmlb_command(), "serve", "--role", "balancer", "--port", str(port)],
        {"LLMLB_HOME": str(home), "LLMLB_ADMIN_PASSWORD": "correct horse"}, port)
    plugins, gate = tmp_path / "plugins", tmp_path / "gate"
    write_plugin(plugins, "gated", GATED_ENGINE)
    node_port = free_port()
    node = start_process(
        [*llmlb_command(), "node", "--balancer-url", balancer.url, "--name", "gpu-a",
         "--port", str(node_port), "--host", "127.0.0.1"],
        {"LLMLB_HOME": str(tmp_path / "node"), "LLMLB_NODE_API_KEY": node_key,
         "LLMLB_PLUGINS_DIR": str(plugins), "LLMLB_HEARTBEAT_SECONDS": "0.5",
         "GATE_FILE": str(gate)}, node_port)

    def nodes() -> dict:
        listed = requests.get(f"{balancer.url}/v0/nodes", timeout=10,
                              headers={"Authorization": f"Bearer {admin}"}).json()["data"]
        return {n["name"]: n for n in listed}

    deadline = time.monotonic() + 60
    while "gpu-a" not in nodes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nodes()["gpu-a"]["status"] == "online", node.log()  # the gate is still shut
    assert not gate.exists() and nodes()["gpu-a"]["engines"] == []
    log = node.log()
    assert "Registering with the balancer" in log and "Registered with the balancer" in log

    gate.touch()
    deadline = time.monotonic() + 120
    while not nodes()["gpu-a"]["engines"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "gated" in {e["name"] for e in nodes()["gpu-a"]["engines"]}


def test_a_node_logs_why_it_cannot_register(start_process, tmp_path: Path) -> None:
    port = free_port()
    node = start_process(
        [*llmlb_command(), "node", "--balancer-url", f"http://127.0.0.1:{free_port()}",
         "--name", "gpu-a", "--port", str(port), "--host", "127.0.0.1"],
        {"LLMLB_HOME": str(tmp_path / "node"), "LLMLB_NODE_API_KEY": "sk-some-node-key"},
        port)
    deadline = time.monotonic() + 60
    while "unreachable" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = node.log()
    assert "Registering with the balancer" in log
    assert "Task heartbeat failed" in log and "Connection refused" in log
    assert log.count("Registering with the balancer") == 1  # not once per attempt


def test_each_commands_help_lists_what_it_takes(llmlb_home: Path) -> None:
    import subprocess

    def help_of(*command: str) -> str:
        return subprocess.run([*llmlb_command(), *command, "--help"], capture_output=True,
                              text=True, check=True, timeout=60).stdout

    node = help_of("node")
    assert "--workers" in node and "llmlb serve" not in node
    for balancers_own in ("--role", "LLMLB_ROLE", "LLMLB_ENDPOINT_MAX_REQUESTS",
                          "LLMLB_ADMIN_PASSWORD", "LLMLB_AFFINITY", "LLMLB_MAX_WEBSOCKETS"):
        assert balancers_own not in node, balancers_own
    for nodes_own in ("--balancer-url", "LLMLB_NODE_API_KEY", "LLMLB_HEARTBEAT_SECONDS",
                      "LLMLB_CONTEXT_LENGTH", "HF_TOKEN"):
        assert nodes_own in node, nodes_own
    # A setting that has a flag is listed once, with its flag.
    assert node.count("LLMLB_BALANCER_URL") == 1 and help_of("serve").count("LLMLB_PORT") == 1
    for small in (("models", "list"), ("keys", "create"), ("users", "set-password")):
        text = help_of(*small)
        assert "LLMLB_ENDPOINT_CHECK_SECONDS" not in text and "--port" not in text, small
    assert "LLMLB_ENDPOINT_CHECK_SECONDS" in help_of()  # the whole table stays at the top

"""Claude Code and Codex CLI, the real programs from npm (``make test`` installs them into
``.npm-tools/``), each completing one turn against llmlb, offline: Claude Code speaks the
Messages API (``POST /v1/messages?beta=true``, streamed, its own system prompt and tools),
Codex the Responses API (``POST /v1/responses``, streamed). A test skips, saying why, when
its program is not installed.

The model is the tiny Llama that ends its answers (Codex sends no output limit) with a 16k
context: Claude Code's system prompt and four of its tools take ~8.5k of the tiny model's
tokens (all its tools would take ~53k, and Codex's full instructions ~27k: their own options
trim them here; a real model's tokenizer needs about a third as many).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from .conftest import REPO, LiveServer, install

BIN = REPO / ".npm-tools" / "node_modules" / ".bin"
TURN_SECONDS = 600  # a 2-core machine shared with other tests reads an 8k-token prompt slowly


def program(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed: `make test` installs it with npm into "
                    f"{BIN.parent.parent}")
    return path


@pytest.fixture
def agent_server(make_server, brief_models: dict[str, Path]) -> tuple[LiveServer, str]:
    server = make_server(context_length=16384)
    return server, install(server, brief_models, "gguf", "tiny-brief")


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: its own HOME, no telemetry, no update checks."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "NO_COLOR": "1", **extra}


def history(server: LiveServer, operation: str) -> list[dict]:
    """The request history's rows of one operation (it is written once a second)."""
    deadline = time.monotonic() + 30
    while True:
        rows = requests.get(f"{server.url}/v0/requests", timeout=10,
                            headers={"Authorization": "Bearer sk_debug"}).json()["data"]
        found = [r for r in rows if r["operation"] == operation]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_claude_code_completes_a_turn(agent_server, tmp_path: Path) -> None:
    claude = program("claude")
    server, model = agent_server
    env = offline_env(
        tmp_path / "home", ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="sk_debug",
        ANTHROPIC_MODEL=model, ANTHROPIC_SMALL_FAST_MODEL=model,
        ANTHROPIC_DEFAULT_HAIKU_MODEL=model, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DISABLE_AUTOUPDATER="1", DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1")
    done = subprocess.run([str(claude), "-p", "Say hi.", "--output-format", "json",
                           "--tools", "Bash,Read,Edit,Write"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=TURN_SECONDS,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["subtype"] == "success" and not result["is_error"]
    assert result["num_turns"] == 1 and result["result"]
    assert result["usage"]["input_tokens"] > 5000  # its whole system prompt and tools
    rows = history(server, "messages")
    assert rows and all(r["status"] == 200 and r["stream"] for r in rows)
    assert rows[0]["tokens_in"] == result["usage"]["input_tokens"]


def test_codex_completes_a_turn(agent_server, tmp_path: Path) -> None:
    codex = program("codex")
    server, model = agent_server
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "instructions.md").write_text("You are a coding agent. Answer briefly.\n")
    (codex_home / "config.toml").write_text(f'''
model = "{model}"
model_provider = "llmlb"

[model_providers.llmlb]
name = "llmlb"
base_url = "{server.url}/v1"
env_key = "LLMLB_API_KEY"
wire_api = "responses"
''')
    work = tmp_path / "work"
    work.mkdir()
    env = offline_env(tmp_path / "home", CODEX_HOME=str(codex_home), LLMLB_API_KEY="sk_debug")
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "--disable", "multi_agent",
         "--disable", "goals", "-c",
         f"model_instructions_file={json.dumps(str(codex_home / 'instructions.md'))}",
         "Say hi."], env=env, cwd=work, capture_output=True, text=True,
        timeout=TURN_SECONDS, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr
    (row,) = history(server, "responses")
    assert row["status"] == 200 and row["stream"] and row["tokens_out"] > 0

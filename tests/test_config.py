"""Settings: defaults < ~/.llmlb/.env < environment < CLI flags, and every one documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmlb.config import OPTIONS, SettingsError, load_settings

from .conftest import llmlb_command


def test_defaults_live_under_llmlb_home(llmlb_home: Path) -> None:
    s = load_settings()
    assert s.home == llmlb_home
    assert s.models_dir == llmlb_home / "models"
    assert s.database == llmlb_home / "llmlb.db"
    assert s.port == 8080 and s.dev is False
    assert s.resolve_wait_seconds == 300 and s.download_timeout_seconds == 300
    assert s.supported_models.name == "supported_models.json"


def test_layers_in_order(llmlb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (llmlb_home / ".env").write_text("LLMLB_PORT=9001\nHF_TOKEN=hf_from_dotenv\n"
                                     "LLMLB_KEEP_ALIVE_SECONDS=7\n")
    s = load_settings()
    assert (s.port, s.hf_token, s.keep_alive_seconds) == (9001, "hf_from_dotenv", 7)
    assert s.sources["port"] == "~/.llmlb/.env"

    monkeypatch.setenv("LLMLB_PORT", "9002")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    s = load_settings()
    assert (s.port, s.hf_token, s.keep_alive_seconds) == (9002, "hf_from_env", 7)

    s = load_settings({"port": 9003})
    assert s.port == 9003 and s.sources["port"] == "flag"


def test_models_dir_names(llmlb_home: Path, monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    monkeypatch.setenv("LLM_MODELS_DIR", str(tmp_path / "compat"))
    assert load_settings().models_dir == tmp_path / "compat"
    monkeypatch.setenv("XLLM_MODELS_DIR", str(tmp_path / "preferred"))
    assert load_settings().models_dir == tmp_path / "preferred"
    assert load_settings({"models_dir": tmp_path / "flag"}).models_dir == tmp_path / "flag"


def test_bad_values_are_named(llmlb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLB_PORT", "eighty")
    with pytest.raises(SettingsError, match="LLMLB_PORT must be a number"):
        load_settings()


def test_allowlist_defaults_to_the_hf_endpoint_host(llmlb_home: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.com/")
    s = load_settings()
    assert s.hf_endpoint == "https://hf-mirror.example.com"
    assert s.download_allowlist == ("hf-mirror.example.com",)
    monkeypatch.setenv("LLMLB_DOWNLOAD_ALLOWLIST", "none")
    assert load_settings().download_allowlist == ()


def test_help_documents_every_setting(llmlb_home: Path) -> None:
    top = subprocess.run([*llmlb_command(), "--help"], capture_output=True, text=True,
                         check=True).stdout
    helps = {command: subprocess.run([*llmlb_command(), command, "--help"],
                                     capture_output=True, text=True, check=True).stdout
             for command in ("serve", "node")}
    for option in OPTIONS:
        for name in option.env:  # ST-9: llmlb --help (and serve, which runs every role)
            assert name in top, f"{name} missing from llmlb --help"
            assert name in helps["serve"], f"{name} missing from llmlb serve --help"
            # a node's help: every option a node takes, none of a balancer's
            assert (name in helps["node"]) == ("node" in option.roles), \
                f"{name} wrongly {'missing from' if 'node' in option.roles else 'in'} " \
                "llmlb node --help"
        for command in option.commands if option.flag else ():
            if command in helps:
                assert option.flag in helps[command], \
                    f"{option.flag} missing from llmlb {command} --help"
    for flag in ("--balancer-url", "--port", "--host", "--models-dir", "--advertise-url",
                 "--name"):  # the interface operators rely on (SPEC, below LB-6)
        assert flag in helps["node"], f"{flag} missing from llmlb node --help"
    assert "--role" in helps["serve"]
    assert "auto_repair" not in top.lower() and "LLM_AUTO_REPAIR" not in top


def test_roles_and_node_defaults(llmlb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.role == "standalone" and s.heartbeat_seconds == 5 and s.node_timeout_seconds == 15
    node = load_settings({"role": "node", "host": "127.0.0.1"})
    assert node.port == 8081 and node.advertise_url == "http://127.0.0.1:8081"
    assert load_settings({"role": "node", "port": 9000}).port == 9000
    monkeypatch.setenv("LLMLB_ROLE", "router")
    with pytest.raises(SettingsError, match="LLMLB_ROLE must be one of"):
        load_settings()
    monkeypatch.setenv("LLMLB_ROLE", "balancer")
    assert load_settings().role == "balancer"
    assert load_settings().worker_class == "gevent"  # no model runs: sockets, not threads
    assert load_settings({"role": "standalone"}).worker_class == "gthread"
    monkeypatch.setenv("LLMLB_WORKER_CLASS", "gevent")
    with pytest.raises(SettingsError, match="engines need real threads"):
        load_settings({"role": "node"})
    with pytest.raises(SettingsError, match="LLMLB_NODE_NAME"):
        load_settings({"node_name": "bad name/.."})
    with pytest.raises(SettingsError, match="LLMLB_BALANCER_URL must be an http"):
        load_settings({"balancer_url": "file:///etc"})
    # Several balancers sharing one state: each URL checked, kept in order.
    several = load_settings({"balancer_url": "http://lb1:8080/, http://lb2:8080"})
    assert several.balancer_urls == ("http://lb1:8080", "http://lb2:8080")
    assert load_settings({"balancer_url": "http://lb1:8080"}).balancer_urls == \
        ("http://lb1:8080",)
    with pytest.raises(SettingsError, match="must be an http.*'file:///etc'"):
        load_settings({"balancer_url": "http://lb1:8080,file:///etc"})


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for o in OPTIONS for name in o.env if f"`{name}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
    assert "make run" in readme and "make test" in readme

"""llmlb deployed as the README says: the shipped systemd units (deploy/systemd/), gunicorn
behind Debian's nginx with the shipped site (deploy/nginx/llmlb.conf), and gunicorn alone:
chat and streams through nginx, a balancer and its node, the client's address, and what an
attacker would try: bare WebSockets, slow clients, oversized bodies, secrets in URLs (SC-2,
SC-6)."""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest
import requests
from requests.adapters import HTTPAdapter
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from llmlb import auth
from llmlb.state import open_database

from .conftest import (
    CLOSED_ENDPOINT,
    HELLO,
    REPO,
    VENV_BIN,
    dashboard_login,
    free_port,
    llmlb_command,
)
from .nginx import check_shipped_site
from .systemd import SYSTEMD_ANALYZE, UNITS, Unit, for_tests, read_env_file, verify
from .test_balancer import install_model
from .test_plugins import SLOW_ENGINE, write_plugin

PASSWORD = "correct horse battery"


def make_key(home: Path, scopes: str) -> str:
    return auth.create_api_key(open_database(home / "llmlb.db"), f"test-{scopes}", scopes)[0]


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://", 1) + "/ws/models" + query


def refusal(url: str, **kwargs) -> tuple[int, dict]:
    """The status and JSON body of a refused WebSocket handshake."""
    with pytest.raises(InvalidStatus) as info, connect(url, open_timeout=10, **kwargs):
        pass
    response = info.value.response
    assert response.headers["Content-Type"].startswith("application/json")
    return response.status_code, json.loads(response.body)["error"]


def log_in(base: str, password: str = PASSWORD) -> requests.Session:
    return dashboard_login(base, password).browser


def test_the_shipped_site_is_valid_with_tls(tmp_path: Path) -> None:
    checked = check_shipped_site(tmp_path / "shipped")
    assert checked.returncode == 0, checked.stderr


def test_websocket_through_nginx_needs_credentials(behind_nginx, llmlb_home: Path) -> None:
    site = behind_nginx(LLMLB_ADMIN_PASSWORD=PASSWORD)
    url = ws_url(site.url)
    # Through nginx every client arrives from 127.0.0.1: no address may stand in for a key.
    status, error = refusal(url)
    assert status == 401 and error["code"] == "invalid_api_key"
    api_key, admin_key = make_key(llmlb_home, "api"), make_key(llmlb_home, "admin")
    status, error = refusal(url, additional_headers={"Authorization": f"Bearer {api_key}"})
    assert status == 403 and error["code"] == "insufficient_scope"
    status, _ = refusal(ws_url(site.url, f"?api_key={admin_key}"))
    assert status == 401  # keys go in headers, never in URLs
    with connect(url, additional_headers={"X-API-Key": admin_key}) as ws, \
            pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)  # connected; nothing to report yet

    # The dashboard's session, from the dashboard's own page only.
    cookie = "session=" + log_in(site.url).cookies["session"]
    with connect(url, origin=site.url, additional_headers={"Cookie": cookie}) as ws, \
            pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)
    for origin in ("http://evil.example", None):
        status, error = refusal(url, origin=origin, additional_headers={"Cookie": cookie})
        assert status == 403 and error["code"] == "origin_not_allowed"


def test_websockets_are_capped_below_the_threads(behind_nginx, llmlb_home: Path) -> None:
    """As many sockets as threads used to leave none for requests: /health timed out."""
    site = behind_nginx(LLMLB_ADMIN_PASSWORD=PASSWORD, LLMLB_THREADS="8")
    # A client's own X-Forwarded-For must not become its address (nginx sets the header on
    # /ws/ as on every request; left unset, the client's would pass through to ProxyFix).
    headers = {"X-API-Key": make_key(llmlb_home, "admin"), "X-Forwarded-For": "203.0.113.5"}
    refused = []
    with ExitStack() as stack:
        opened = []
        for _ in range(8):
            try:
                opened.append(stack.enter_context(connect(ws_url(site.url), open_timeout=10,
                                                          additional_headers=headers)))
            except InvalidStatus as exc:
                refused.append(exc.response)
        assert len(opened) == 4  # LLMLB_MAX_WEBSOCKETS defaults to half the threads
        assert {r.status_code for r in refused} == {503}
        assert b"too_many_websockets" in refused[0].body
        assert int(refused[0].headers["Retry-After"]) > 0
        assert requests.get(f"{site.url}/health", timeout=5).status_code == 200
    assert "WebSocket refused for 127.0.0.1: 4 already open" in site.app.log()
    assert "203.0.113.5" not in site.app.log()
    # Closed sockets give their slots back.
    deadline = time.monotonic() + 15
    while True:
        try:
            with connect(ws_url(site.url), additional_headers=headers, open_timeout=10):
                break
        except InvalidStatus:
            assert time.monotonic() < deadline, "slots were not released"
            time.sleep(0.5)


def half_requests(port: int, count: int) -> list[socket.socket]:
    """Connections that each send half a request line, then wait (a slowloris)."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /hea")
        sockets.append(s)
    return sockets


def test_slow_clients_do_not_stall_llmlb_serve(start_process, llmlb_home: Path) -> None:
    port = free_port()
    proc = start_process([*llmlb_command(), "serve", "--port", str(port)],
                         {"LLMLB_HEADER_TIMEOUT_SECONDS": "2"}, port)
    slow = half_requests(port, 40)  # more than its 32 threads
    try:
        time.sleep(0.5)
        assert requests.get(f"{proc.url}/health", timeout=10).status_code == 200
    finally:
        for s in slow:
            s.close()
    assert "request headers did not arrive within 2 s" in proc.log()


def test_slow_clients_through_nginx(behind_nginx) -> None:
    """nginx reads whole requests before passing them on: llmlb never sees the slow ones
    (its own header deadline is off here, to show that)."""
    site = behind_nginx(LLMLB_THREADS="8", LLMLB_HEADER_TIMEOUT_SECONDS="0")
    slow = half_requests(site.proxy.port, 40)
    try:
        time.sleep(0.5)
        assert requests.get(f"{site.url}/health", timeout=5).status_code == 200
    finally:
        for s in slow:
            s.close()


def test_oversized_body_through_nginx_is_json_413(behind_nginx) -> None:
    site = behind_nginx(LLMLB_DEV="1")
    body = b'{"model": "m", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    r = requests.post(f"{site.url}/v1/completions", data=body, timeout=30,
                      headers={"Authorization": "Bearer sk_debug",
                               "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"]["code"] == "request_too_large"


def test_no_secret_in_any_log(behind_nginx, llmlb_home: Path) -> None:
    site = behind_nginx(LLMLB_ADMIN_PASSWORD=PASSWORD)
    key = make_key(llmlb_home, "admin")
    assert requests.get(f"{site.url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                        timeout=10).status_code == 200
    requests.get(f"{site.url}/v1/models?api_key={key}", timeout=10)
    requests.get(f"{site.app.url}/v1/models?api_key={key}", timeout=10)  # gunicorn directly
    refusal(ws_url(site.url, f"?api_key={key}"))
    refusal(ws_url(site.app.url, f"?api_key={key}"))
    wrong = "hunter2-wrong-password"
    log_in(site.url, password=wrong)
    time.sleep(0.5)  # let the access logs flush
    logs = site.app.log() + site.proxy.logs()
    assert "/v1/models" in logs and "/ws/models" in logs  # the requests were logged...
    assert "Failed login for user 'admin' from 127.0.0.1" in logs  # ...and the failure...
    assert key not in logs and key[10:] not in logs and wrong not in logs  # ...no secret


# --- systemd units ----------------------------------------------------------------------------

UNIT_FILES = sorted(UNITS.glob("*.service"))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed "
                    "(Debian's systemd package provides it)")
@pytest.mark.parametrize("shipped", UNIT_FILES, ids=lambda p: p.name)
def test_the_systemd_units_are_valid(shipped: Path, tmp_path: Path) -> None:
    unit_file = tmp_path / shipped.name
    unit_file.write_text(for_tests(shipped.read_text(), VENV_BIN))
    checked = verify(unit_file)
    # verify only warns about a misspelt key or a bad value: any output is a finding.
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    unit = Unit.load(shipped)
    assert unit.value("User") == "llmlb" and unit.value("NoNewPrivileges") == "yes"
    assert unit.value("ProtectSystem") == "strict"
    assert unit.value("Restart") in ("always", "on-failure")
    # The only writable place is LLMLB_HOME, created 0700 for the service's user (SC-4).
    home = unit.environment["LLMLB_HOME"]
    assert unit.values("ReadWritePaths") == [home] and unit.environment["HOME"] == home
    assert f"/var/lib/{unit.value('StateDirectory')}" == home
    assert unit.value("StateDirectoryMode") == "0700"


def unit_env(name: str, env_file: Path, **overrides: str) -> tuple[Unit, list[str], dict]:
    """The unit's ExecStart and the environment systemd gives it: the unit's Environment=,
    its EnvironmentFile= (here ``env_file``: the shipped example beside the unit, edited),
    then the test's ``overrides`` (addresses and directories of this machine)."""
    unit = Unit.load(UNITS / name, for_tests((UNITS / name).read_text(), VENV_BIN))
    assert len(unit.environment_files) == 1
    env = {**os.environ, **unit.environment, **read_env_file(env_file), **overrides,
           "PYTHONUNBUFFERED": "1"}
    assert Path(unit.value("WorkingDirectory")) == REPO
    return unit, unit.exec_start, env


def test_systemd_units_run_a_balancer_and_its_node_behind_nginx(
        start_process, nginx, tiny, llmlb_home: Path, tmp_path: Path) -> None:
    """The units' own ExecStart lines, with their environment, serve as the README says:
    chat through nginx reaches the node, and streamed chunks arrive one by one."""
    home = tmp_path / "balancer"
    env_file = tmp_path / "balancer.env"
    env_file.write_text((UNITS / "balancer.env").read_text().replace("change-me", PASSWORD))
    port = free_port()
    _, command, env = unit_env("llmlb-balancer.service", env_file, LLMLB_HOME=str(home),
                               HOME=str(home), LLMLB_PORT=str(port),
                               HF_ENDPOINT=CLOSED_ENDPOINT)
    assert command[0].endswith("/gunicorn") and env["LLMLB_ROLE"] == "balancer"
    balancer = start_process(command, env, port)
    assert len(gunicorn_workers(balancer, 2)) == 2  # LLMLB_WORKERS=2 from the env file
    admin, api = make_key(home, "admin"), make_key(home, "api")
    site = nginx(port)

    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_ENGINE)
    node_home = tmp_path / "node"
    install_model(node_home / "models", "tiny", tiny["llama-gguf"])
    install_model(node_home / "models", "snail", "slow:0.1")
    node_env_file = tmp_path / "node.env"
    node_env_file.write_text((UNITS / "node.env").read_text()
                             .replace("http://lb.example.com:8080", site.url)
                             .replace("sk-replace-me", make_key(home, "node")))
    node_port = free_port()
    _, command, env = unit_env(
        "llmlb-node.service", node_env_file, LLMLB_HOME=str(node_home), HOME=str(node_home),
        LLMLB_PORT=str(node_port), LLMLB_HOST="127.0.0.1", LLMLB_NODE_NAME="gpu-a",
        LLMLB_PLUGINS_DIR=str(plugins), LLMLB_HEARTBEAT_SECONDS="0.5",
        HF_ENDPOINT=CLOSED_ENDPOINT)
    assert command[1:] == ["node"]
    node = start_process(command, env, node_port)
    deadline = time.monotonic() + 60
    while True:  # the node registers with the balancer through nginx
        nodes = requests.get(f"{site.url}/v0/nodes", headers={"Authorization": f"Bearer {admin}"},
                             timeout=10).json()["data"]
        if any(n["name"] == "gpu-a" and n["status"] == "online" and "tiny" in n["models"]
               and n["engines"] for n in nodes):  # engines: their checks are done
            break
        assert time.monotonic() < deadline, f"{nodes}\n{node.log()[-3000:]}"
        time.sleep(0.2)

    client = openai.OpenAI(base_url=f"{site.url}/v1", api_key=api, max_retries=0, timeout=60)
    reply = client.chat.completions.with_raw_response.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert reply.headers["X-LLMLB-Node"] == "gpu-a"
    assert reply.parse().usage.completion_tokens == 8

    sent = time.monotonic()
    arrivals = [time.monotonic() for chunk in client.chat.completions.create(
        model="snail", messages=HELLO, max_tokens=10, stream=True)
        if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) == 10
    # One token per 100 ms at the node: buffered by nginx, they would arrive together.
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert gaps[len(gaps) // 2] > 0.05, gaps
    assert arrivals[0] - sent < (arrivals[-1] - sent) / 2


def gunicorn_workers(proc, count: int, timeout: float = 30) -> list[int]:
    """The pids of the gunicorn master's worker processes, once ``count`` have booted."""
    deadline = time.monotonic() + timeout
    while True:
        children = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                              if ":\t" in line)
            except OSError:
                continue  # the process ended meanwhile
            if fields.get("PPid", "").strip() == str(proc.process.pid):
                children.append(int(status.parent.name))
        if len(children) >= count or time.monotonic() > deadline:
            return children
        time.sleep(0.2)


class FromAddress(HTTPAdapter):
    """Connect from a chosen local address (any of 127.0.0.0/8 is this machine)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.mark.parametrize("trusted, seen", [("1", "127.0.0.7"), ("0", "127.0.0.1")],
                         ids=["trusted", "untrusted"])
def test_the_client_address_comes_through_nginx_only_when_trusted(
        behind_nginx, trusted: str, seen: str) -> None:
    """With LLMLB_TRUSTED_PROXIES=1 llmlb sees the client's own address (what nginx added to
    X-Forwarded-For, never what the client wrote there); without it, nginx's address."""
    site = behind_nginx(LLMLB_ADMIN_PASSWORD=PASSWORD, LLMLB_TRUSTED_PROXIES=trusted)
    browser = requests.Session()
    browser.mount("http://", FromAddress("127.0.0.7"))
    browser.headers["X-Forwarded-For"] = "203.0.113.9"  # forged by the client
    assert dashboard_login(site.url, "wrong password", browser=browser).status_code == 401
    log = site.app.log()
    assert f"Failed login for user 'admin' from {seen} " in log, log[-2000:]
    assert "203.0.113.9" not in log

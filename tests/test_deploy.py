"""llmlb deployed as the README says: gunicorn behind Debian's nginx with the shipped site
(deploy/nginx/llmlb.conf), and gunicorn alone, against what an attacker would try: bare
WebSockets, slow clients, oversized bodies, secrets in URLs (SC-2, SC-6)."""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from llmlb import auth
from llmlb.db import Database

from .conftest import dashboard_login, free_port, llmlb_command
from .nginx import check_shipped_site

PASSWORD = "correct horse battery"


def make_key(home: Path, scopes: str) -> str:
    return auth.create_api_key(Database(home / "llmlb.db"), f"test-{scopes}", scopes)[0]


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

"""Who may open ``/ws/models`` (SC-2), and how many at once. No address is trusted: these
clients all connect from loopback, as every client does behind nginx."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from llmlb import auth
from llmlb.config import SettingsError, load_settings

from .conftest import LiveServer, dashboard_login, page_csrf

PASSWORD = "correct horse battery"


def ws_url(server: LiveServer, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws/models" + query


def refused(url: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info, connect(url, open_timeout=10, **kwargs):
        pass
    response = info.value.response
    return response.status_code, json.loads(response.body)["error"]["code"]


def opens(url: str, **kwargs) -> bool:
    with connect(url, open_timeout=10, **kwargs) as ws, pytest.raises(TimeoutError):
        ws.recv(timeout=0.2)  # connected; nothing to report yet
    return True


@pytest.fixture
def prod(hub_server) -> LiveServer:
    return hub_server(dev=False, admin_password=PASSWORD)


def test_keys_in_headers(prod: LiveServer) -> None:
    url = ws_url(prod)
    assert refused(url) == (401, "invalid_api_key")  # from 127.0.0.1, with nothing
    assert refused(url, additional_headers={"X-API-Key": "sk-wrong"}) == (401, "invalid_api_key")
    api_key, _ = auth.create_api_key(prod.runtime.db, "inference", "api")
    assert refused(url, additional_headers={"X-API-Key": api_key}) == (403, "insufficient_scope")
    key, _ = auth.create_api_key(prod.runtime.db, "admin", "admin")
    assert opens(url, additional_headers={"Authorization": f"Bearer {key}"})
    assert opens(url, additional_headers={"X-API-Key": key})
    assert refused(ws_url(prod, f"?api_key={key}")) == (401, "invalid_api_key")


def test_a_dashboard_session_from_its_own_page(prod: LiveServer) -> None:
    cookie = {"Cookie": "session=" + dashboard_login(prod.url, PASSWORD).cookies["session"]}
    assert opens(ws_url(prod), origin=prod.url, additional_headers=cookie)
    for origin in ("http://evil.example", prod.url.replace("127.0.0.1", "localhost"), None):
        assert refused(ws_url(prod), origin=origin, additional_headers=cookie) == (
            403, "origin_not_allowed"), origin


def test_the_seeds_bare_client_only_in_dev_mode(hub_server) -> None:
    assert opens(ws_url(hub_server(dev=True)))


def test_websockets_are_capped(hub_server) -> None:
    server = hub_server(max_websockets=2)
    with ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(connect(ws_url(server), open_timeout=10))
        assert refused(ws_url(server)) == (503, "too_many_websockets")
    # A closed socket frees its slot once its thread notices (within about a second).
    with ExitStack() as stack:
        for _ in range(2):
            for attempt in range(20):
                try:
                    stack.enter_context(connect(ws_url(server), open_timeout=10))
                    break
                except InvalidStatus:
                    assert attempt < 19
                    time.sleep(0.25)


def test_the_cap_stays_below_the_threads(llmlb_home) -> None:
    assert load_settings({"threads": 32}).max_websockets == 16
    assert load_settings({"threads": 8, "max_websockets": 7}).max_websockets == 7
    with pytest.raises(SettingsError, match="LLMLB_MAX_WEBSOCKETS .* must be below"):
        load_settings({"threads": 8, "max_websockets": 8})


def closed_within(ws, seconds: float = 15) -> ConnectionClosed:  # noqa: ANN001
    """The close the server sends: events before it are read past."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ws.recv(timeout=1)
        except TimeoutError:
            continue
        except ConnectionClosed as closed:
            return closed
    raise AssertionError("the socket stayed open")


def test_an_open_socket_ends_with_its_session(prod: LiveServer) -> None:
    """Logging out, or a new password set with the CLI, closes the sockets that session
    opened (1008, "log in again"), and the events stop."""
    from .test_auth import users_cli

    for end in ("logout", "password"):
        browser = dashboard_login(prod.url, PASSWORD).browser
        cookie = {"Cookie": f"session={browser.cookies['session']}"}
        with connect(ws_url(prod), origin=prod.url, additional_headers=cookie,
                     open_timeout=10) as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=1.5)  # open, and stays open while the session lasts
            if end == "logout":
                csrf = page_csrf(browser, f"{prod.url}/keys")
                browser.post(f"{prod.url}/logout", data={"csrf_token": csrf}, timeout=10)
            else:
                assert users_cli("users", "set-password", "admin",
                                 password=PASSWORD + "!").returncode == 0
                auth.set_password(prod.runtime.db, "admin", PASSWORD)
            closed = closed_within(ws)
        assert closed.rcvd is not None and closed.rcvd.code == 1008, end
        assert "log in again" in closed.rcvd.reason


def test_an_open_socket_ends_with_its_key(prod: LiveServer) -> None:
    key, record = auth.create_api_key(prod.runtime.db, "admin", "admin")
    with connect(ws_url(prod), additional_headers={"X-API-Key": key}, open_timeout=10) as ws:
        auth.revoke_api_key(prod.runtime.db, record.id)
        closed = closed_within(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1008

"""Dashboard sessions end when they should (SC-3): a cookie saved before a logout or a
password change is refused afterwards, a development-mode login does not survive a restart
without --dev, and every login expires."""

from __future__ import annotations

import subprocess
import time

import pytest
import requests

from .conftest import LiveServer, dashboard_login, llmlb_command, page_csrf

PASSWORD = "correct horse battery"


@pytest.fixture
def prod(make_server, engine: str) -> LiveServer:
    """A production-mode server, on each state engine."""
    return make_server(dev=False, admin_password=PASSWORD)


def saved_cookie(server: LiveServer, password: str = PASSWORD,
                 username: str = "admin") -> tuple[requests.Session, dict, str]:
    """A logged-in browser, a copy of its cookie as an attacker would keep it, and its CSRF
    token."""
    response = dashboard_login(server.url, password, username)
    assert response.status_code == 302, response.text
    browser = response.browser
    csrf = page_csrf(browser, f"{server.url}/keys")
    return browser, {"session": browser.cookies["session"]}, csrf


def can_manage_keys(server: LiveServer, cookie: dict, csrf: str) -> tuple[int, int]:
    listed = requests.get(f"{server.url}/api/keys", cookies=cookie, timeout=10)
    created = requests.post(f"{server.url}/api/keys", json={"name": "stolen"}, cookies=cookie,
                            headers={"X-CSRF-Token": csrf}, timeout=10)
    return listed.status_code, created.status_code


def test_a_saved_cookie_is_refused_after_logout(prod: LiveServer) -> None:
    browser, cookie, csrf = saved_cookie(prod)
    other_browser, other_cookie, other_csrf = saved_cookie(prod)
    assert can_manage_keys(prod, cookie, csrf) == (200, 201)
    browser.post(f"{prod.url}/logout", data={"csrf_token": csrf}, timeout=10)
    assert can_manage_keys(prod, cookie, csrf) == (401, 401)
    # Logging out ends every session of the user, not only this browser's.
    assert can_manage_keys(prod, other_cookie, other_csrf) == (401, 401)
    page = requests.get(f"{prod.url}/keys", cookies=cookie, allow_redirects=False, timeout=10)
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert dashboard_login(prod.url, PASSWORD).status_code == 302  # logging in again works


def test_a_saved_cookie_is_refused_after_a_password_change(prod: LiveServer) -> None:
    _, cookie, csrf = saved_cookie(prod)
    assert can_manage_keys(prod, cookie, csrf) == (200, 201)
    subprocess.run([*llmlb_command(), "users", "set-password", "admin"], check=True,
                   input="a new passphrase\na new passphrase\n", capture_output=True, text=True)
    assert can_manage_keys(prod, cookie, csrf) == (401, 401)
    assert dashboard_login(prod.url, PASSWORD).status_code == 401
    assert dashboard_login(prod.url, "a new passphrase").status_code == 302


def test_a_dev_session_does_not_survive_a_restart_without_dev(make_server, engine: str) -> None:
    dev = make_server(dev=True)
    _, cookie, csrf = saved_cookie(dev, password="test")
    assert can_manage_keys(dev, cookie, csrf) == (200, 201)
    # Same home, same signing key, now without --dev: the real 'admin' must not inherit it.
    prod = make_server(dev=False, admin_password=PASSWORD)
    assert can_manage_keys(prod, cookie, csrf) == (401, 401)


def test_sessions_expire(make_server, engine: str) -> None:
    server = make_server(dev=False, admin_password=PASSWORD, session_lifetime_seconds=2)
    browser, cookie, csrf = saved_cookie(server)
    set_cookie = dashboard_login(server.url, PASSWORD).headers["Set-Cookie"]
    assert "Expires=" in set_cookie  # the browser forgets it too
    assert can_manage_keys(server, cookie, csrf) == (200, 201)
    time.sleep(1.2)
    browser.get(f"{server.url}/models", timeout=10)  # activity does not extend a login
    time.sleep(1.2)
    assert can_manage_keys(server, cookie, csrf) == (401, 401)


def test_a_dashboard_call_after_logout_says_the_session_ended(prod: LiveServer) -> None:
    """Not "Missing API key": the dashboard's user is told to log in again, whether the
    call carries the ended session's cookie or (the same browser, after its logout) only
    the page's CSRF header."""
    browser, cookie, csrf = saved_cookie(prod)
    browser.post(f"{prod.url}/logout", data={"csrf_token": csrf}, timeout=10)
    for how in ({"cookies": cookie}, {"headers": {"X-CSRF-Token": csrf}}):
        r = requests.get(f"{prod.url}/api/keys", timeout=10, **how)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "session_ended", how
        assert "log in again" in error["message"] and "API key" not in error["message"]
    # A program without any credentials is still asked for a key.
    r = requests.get(f"{prod.url}/api/keys", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("Missing API key")

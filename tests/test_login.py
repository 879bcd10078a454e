"""Dashboard logins (SC-6): throttled per client and per user name across workers, failures
logged, and no way to tell existing user names from the time an answer takes."""

from __future__ import annotations

import statistics
import time

import pytest
import requests

from .conftest import LiveServer, dashboard_login

PASSWORD = "correct horse battery"


def attempt(server: LiveServer, username: str, password: str, client: str) -> requests.Response:
    """A login from ``client``, as nginx reports it (the servers trust one proxy)."""
    browser = requests.Session()
    browser.headers["X-Forwarded-For"] = client
    return dashboard_login(server.url, password, username, browser=browser)


def test_logins_are_throttled_per_client_and_per_user(make_server, engine: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # Two apps on one state stand for two gunicorn workers, or two balancers: they count
    # the same failures.
    one = make_server(dev=False, admin_password=PASSWORD, trusted_proxies=1,
                      login_max_failures=3)
    two = make_server(dev=False, admin_password=PASSWORD, trusted_proxies=1,
                      login_max_failures=3)
    attacker, bystander = "203.0.113.7", "198.51.100.4"
    for server in (one, two, one):
        assert attempt(server, "admin", "guess", attacker).status_code == 401
    refused = attempt(two, "admin", "guess", attacker)
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 900
    assert "Too many failed logins" in refused.text
    # Throttled means throttled: not even the right password gets through now...
    assert attempt(one, "admin", PASSWORD, attacker).status_code == 429
    # ...for this user from anywhere, nor for anyone from this client.
    assert attempt(one, "admin", PASSWORD, bystander).status_code == 429
    assert attempt(one, "someone", "guess", attacker).status_code == 429
    assert attempt(one, "someone", "guess", bystander).status_code == 401

    failures = [r.getMessage() for r in caplog.records if "Failed login" in r.getMessage()]
    assert len(failures) == 4
    assert failures[0].startswith("Failed login for user 'admin' from 203.0.113.7")
    assert any("Login refused for user 'admin' from 203.0.113.7" in r.getMessage()
               for r in caplog.records)
    assert not any(PASSWORD in r.getMessage() or "guess" in r.getMessage()
                   for r in caplog.records)


def test_a_login_clears_earlier_failures(make_server, engine: str) -> None:
    server = make_server(dev=False, admin_password=PASSWORD, login_max_failures=3)
    for _ in range(2):
        assert dashboard_login(server.url, "typo").status_code == 401
    assert dashboard_login(server.url, PASSWORD).status_code == 302
    for _ in range(2):
        assert dashboard_login(server.url, "typo").status_code == 401
    assert dashboard_login(server.url, PASSWORD).status_code == 302


def test_unknown_users_answer_as_slowly_as_known_ones(make_server) -> None:
    """Checking a password takes a slow hash; an unknown user must cost the same, or the
    answer's timing lists the user names that exist."""
    server = make_server(dev=False, admin_password=PASSWORD, login_max_failures=1000)
    browser = requests.Session()
    dashboard_login(server.url, "warm-up", browser=browser)

    def seconds(username: str) -> float:
        start = time.perf_counter()
        assert dashboard_login(server.url, "wrong", username, browser=browser).status_code == 401
        return time.perf_counter() - start

    known = statistics.median(seconds("admin") for _ in range(7))
    unknown = statistics.median(seconds(f"nobody-{i}") for i in range(7))
    # Seen before the fix: 108 ms against 1.6 ms. A loaded machine adds noise, not a 3x gap.
    assert unknown > known / 3, (known, unknown)

"""Dashboard pages send a strict Content-Security-Policy (no inline script), may not be
framed, and keep browsers from guessing types or leaking URLs (SC-6). The browser tests
(test_dashboard.py) fail on any policy violation, so the pages really keep to it."""

from __future__ import annotations

import re

import requests

from .conftest import dashboard_login

PASSWORD = "correct horse battery"


def policy(header: str) -> dict[str, list[str]]:
    directives = (part.split() for part in header.split(";") if part.strip())
    return {d[0]: d[1:] for d in directives}


def test_dashboard_pages_send_security_headers(make_server) -> None:
    server = make_server(dev=False, admin_password=PASSWORD)
    browser = dashboard_login(server.url, PASSWORD).browser
    for path in ("/login", "/models", "/playground", "/keys", "/static/app.js"):
        r = browser.get(server.url + path, timeout=10)
        assert r.status_code == 200, path
        csp = policy(r.headers["Content-Security-Policy"])
        assert csp["frame-ancestors"] == ["'none'"]
        assert csp["default-src"] == ["'self'"]
        assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
        assert "unsafe-inline" not in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "same-origin"
        assert r.headers["X-Frame-Options"] == "DENY"
        if path.startswith("/static"):
            continue
        # The pages keep to the policy: scripts come from files, no handlers or styles inline.
        assert all("src=" in tag for tag in re.findall(r"<script\b[^>]*>", r.text)), path
        assert not re.search(r"<script\b[^>]*>\s*[^<\s]", r.text), path
        assert not re.search(r"\son[a-z]+\s*=", r.text, re.IGNORECASE), path
        assert "style=" not in r.text and "<style" not in r.text, path


def test_api_answers_carry_them_too(make_server) -> None:
    server = make_server()
    r = requests.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk_debug"},
                     timeout=10)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]

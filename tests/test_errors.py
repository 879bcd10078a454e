"""Every error under /v1, /v0 and /api is OpenAI-style JSON (AP-2, AP-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from llmlb.catalog import CatalogError, parse_catalog

from .conftest import LiveServer

DEV = {"Authorization": "Bearer sk_debug"}


def assert_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert "Traceback" not in response.text and "<html" not in response.text.lower()
    return error


@pytest.mark.parametrize("path", ["/v1/nope", "/v0/nope", "/api/nope", "/v1"])
def test_unknown_urls_are_json_404(server: LiveServer, path: str) -> None:
    assert_error(requests.get(server.url + path, headers=DEV, timeout=10), 404, "not_found")


def test_wrong_method_is_json_405(server: LiveServer) -> None:
    r = requests.delete(f"{server.url}/v1/models", headers=DEV, timeout=10)
    assert_error(r, 405, "method_not_allowed")
    assert "GET" in r.headers["Allow"]
    assert_error(requests.get(f"{server.url}/v1/chat/completions", headers=DEV, timeout=10),
                 405, "method_not_allowed")


def test_broken_json_is_400(server: LiveServer) -> None:
    for body in (b"{bad", b"", b"[1, 2]", b"\xff\xfe"):
        r = requests.post(f"{server.url}/v1/chat/completions", data=body,
                          headers={**DEV, "Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(f"{server.url}/v1/chat/completions", data=b"{bad", headers=DEV,
                      timeout=10)
    assert_error(r, 400, "invalid_json")


def test_body_size_is_limited(make_server) -> None:
    server = make_server(max_body_bytes=1000)
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})
    r = requests.post(f"{server.url}/v1/chat/completions", data=big,
                      headers={**DEV, "Content-Type": "application/json"}, timeout=10)
    assert_error(r, 413, "request_too_large")


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5},
     "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     "stream"),
])
def test_validation_names_the_field(server: LiveServer, body: dict, param: str) -> None:
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=DEV, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert param in r.json()["error"]["message"]


def test_unknown_model_is_404_with_catalog_hint(server: LiveServer) -> None:
    r = requests.post(f"{server.url}/v1/chat/completions", headers=DEV, timeout=10,
                      json={"model": "unknown-model",
                            "messages": [{"role": "user", "content": "Hello"}]})
    error = assert_error(r, 404, "model_not_found")
    assert error["message"] == ("Model 'unknown-model' is not supported. "
                                "Check supported_models.json.")
    assert error["type"] == "invalid_request_error"


def test_dashboard_paths_are_not_forced_to_json(server: LiveServer) -> None:
    r = requests.get(f"{server.url}/definitely-not-a-page", timeout=10)
    assert r.status_code == 404
    assert not r.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("mutation,message", [
    (lambda m: m.pop("repo_id"), "needs a repo_id"),
    (lambda m: m.update(artifacts=[]), "at least one artifact"),
    (lambda m: m.update(required_vram_mb=0), "required_vram_mb must be a positive"),
    (lambda m: m.update(source="ftp"), "unknown source 'ftp'"),
    (lambda m: m.update(id="../x"), "invalid id"),
])
def test_catalog_validation_messages(mutation, message: str) -> None:
    catalog = json.loads((Path(__file__).parent.parent / "supported_models.json").read_text())
    mutation(catalog["models"][0])
    with pytest.raises(CatalogError, match=message):
        parse_catalog(catalog)


def test_errors_are_built_only_in_errors_py() -> None:
    """errors.py decides each code's status and wording; a second place would drift from it
    (and from the README's table of errors)."""
    root = Path(__file__).resolve().parent.parent
    inline = [f"{path.relative_to(root)}:{n}" for folder in ("llmlb", "engines", "plugins")
              for path in sorted((root / folder).rglob("*.py")) if path.name != "errors.py"
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if "APIError(" in line and not line.lstrip().startswith("#")]
    assert inline == [], "build these errors with a constructor in llmlb/errors.py"

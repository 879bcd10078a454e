"""Input that used to answer 500 now answers a clear 4xx (AP-2, SC-6): deeply nested JSON, a
lone UTF-16 surrogate, an oversized chunked body, a model id too long for a file name."""

from __future__ import annotations

import http.client
import json

import pytest
import requests

from .conftest import HELLO, LiveServer, install
from .test_errors import assert_error

DEV = {"Authorization": "Bearer sk_debug", "Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/api/keys",
                                  "/api/models/register"])
def test_deeply_nested_json_is_400(server: LiveServer, path: str) -> None:
    depth = 100_000
    for body in ("[" * depth + "]" * depth,
                 '{"model": "m", "messages": ' + "[" * depth + "]" * depth + "}"):
        r = requests.post(server.url + path, data=body, headers=DEV, timeout=30)
        error = assert_error(r, 400, "invalid_json")
        assert "nested too deeply" in error["message"]


def test_a_lone_surrogate_is_400_and_a_pair_is_text(server: LiveServer, tiny) -> None:
    model = install(server, tiny, "llama-gguf", "tiny-gguf")

    def chat(content: str) -> requests.Response:  # content as written in the JSON text
        body = ('{"model": "' + model + '", "max_tokens": 2, "messages": '
                '[{"role": "user", "content": "' + content + '"}]}')
        return requests.post(f"{server.url}/v1/chat/completions", data=body, headers=DEV,
                             timeout=60)

    for content in ("\\udcff", "before \\ud83d after", "\\ude00\\ud83d"):
        error = assert_error(chat(content), 400, "invalid_json")
        assert "surrogate" in error["message"]
    # A surrogate *pair* is how JSON escapes an emoji: that is text, and works.
    r = chat("smile \\ud83d\\ude00")
    assert r.status_code == 200, r.text


def chunked_post(server: LiveServer, path: str, body: bytes) -> tuple[int, dict]:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=(body[i:i + 300] for i in range(0, len(body), 300)),
                 headers=DEV, encode_chunked=True)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_an_oversized_chunked_body_is_413(make_server) -> None:
    """Without Content-Length the body used to be cut at the limit and the rest ignored: a
    request other than the one sent was processed."""
    server = make_server(max_body_bytes=1000)
    padded = b'{"name": "chunky"}' + b" " * 5000
    status, body = chunked_post(server, "/api/keys", padded)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    exact = b'{"name": "exact"}'.ljust(1000)
    assert chunked_post(server, "/api/keys", exact)[0] == 201  # the limit itself is allowed
    assert chunked_post(server, "/api/keys", b'{"name": "small"}')[0] == 201
    names = [k["name"] for k in requests.get(f"{server.url}/api/keys", headers=DEV,
                                             timeout=10).json()["keys"]]
    assert names == ["exact", "small"]


LONG = "a" * 256  # valid by ST-3 (256 characters), longer than a file name may be on ext4


@pytest.mark.parametrize("method,path,status,code", [
    ("POST", "/v1/chat/completions", 404, "model_not_found"),
    ("POST", "/v1/completions", 404, "model_not_found"),
    ("POST", "/v1/embeddings", 404, "model_not_found"),
    ("GET", f"/v1/models/{LONG}", 404, "model_not_found"),
    ("GET", f"/v1/models/blob/{LONG}/model.gguf", 404, "model_not_found"),
    ("GET", f"/v0/models/registry/{LONG}/manifest.json", 404, "model_not_found"),
    ("GET", f"/v0/models/{LONG}/status", 404, "model_not_found"),
    ("DELETE", f"/api/models/{LONG}", 404, "model_not_found"),
    ("POST", "/api/models/register", 400, "model_not_supported"),
])
def test_a_256_character_id_is_not_a_500(server: LiveServer, method: str, path: str,
                                         status: int, code: str) -> None:
    body = {"model": LONG, "model_id": LONG, "messages": HELLO, "prompt": "hi", "input": "hi"}
    r = requests.request(method, server.url + path, json=body if method == "POST" else None,
                         headers=DEV, timeout=30)
    assert_error(r, status, code)


@pytest.mark.parametrize("method,path,code", [
    ("DELETE", "/v0/nodes//heartbeat", "not_found"),
    ("GET", "/v1//models", "not_found"),
    ("GET", "/v0/models//x/status", "not_found"),
])
def test_double_slashes_are_json_not_an_html_redirect(server: LiveServer, method: str,
                                                      path: str, code: str) -> None:
    """Found by tests/test_properties.py: werkzeug redirected "a//b" to "a/b" with an HTML
    308 (and "/x" as a model id would have become "x")."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, headers=DEV)
    response = conn.getresponse()
    assert response.getheader("Content-Type").startswith("application/json")
    body = json.loads(response.read())
    assert response.status in (400, 404) and body["error"]["code"] == code, body


def test_options_under_the_api_is_no_content(server: LiveServer) -> None:
    r = requests.options(f"{server.url}/v1/chat/completions", timeout=10)
    assert r.status_code == 204 and r.content == b"" and "POST" in r.headers["Allow"]
    assert "text/html" not in r.headers.get("Content-Type", "")


def test_a_non_ascii_key_is_401(server: LiveServer) -> None:
    """Found by tests/test_properties.py: comparing it with the development key raised."""
    for headers in ({"Authorization": "Bearer sk_débug"}, {"X-API-Key": "clé"}):
        r = requests.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert_error(r, 401, "invalid_api_key")

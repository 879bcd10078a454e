"""The proxied inference routes' fast path (issue 20, part 1) answers exactly as Flask does.

A request with a Content-Length goes the fast way; the same request sent chunked (no
Content-Length) goes through Flask. The two answers must be the same: status, headers (but
the date) and bytes, for an answer relayed from an endpoint, a stream, and the balancer's own
errors. The members are ``tests/fake_openai.py`` endpoints behind a real balancer.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

from .test_endpoints import ADMIN, FAST, add

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 4}


def post(url: str, body: bytes, chunked: bool, headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    sent = {"Content-Type": "application/json", **ADMIN, **(headers or {})}
    if chunked:
        conn.request("POST", path, body=_pieces(body), headers=sent, encode_chunked=True)
    else:
        conn.request("POST", path, body=body, headers=sent)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    # What legitimately differs: the time, and a streamed body's framing
    drop = {"date", "content-length", "transfer-encoding"}
    return response.status, {k.lower(): v for k, v in response.getheaders()
                             if k.lower() not in drop}, data


def _pieces(body: bytes) -> Iterator[bytes]:
    yield body[:5]
    yield body[5:]


def both(url: str, payload: dict | bytes, **kwargs) -> tuple[tuple, tuple]:  # noqa: ANN003
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return post(url, body, False, **kwargs), post(url, body, True, **kwargs)


def test_the_fast_way_and_flask_give_the_same_answers(make_server, fakes) -> None:
    a = fakes("a")
    server = make_server(**FAST)
    assert add(server, "a", a.url).status_code == 201

    fast, flask = both(server.url, CHAT)
    assert fast[0] == 200, fast
    assert fast[1]["x-llmlb-node"] == "a" and fast[1]["x-content-type-options"] == "nosniff"
    assert "x-llmlb-worker" in fast[1] and fast[1]["content-type"] == "application/json"
    # The fake's ids and times differ per answer: the same answer, but for them
    assert fast[1] == flask[1]
    assert json.loads(fast[2]).keys() == json.loads(flask[2]).keys()

    fast, flask = both(server.url, {**CHAT, "stream": True})
    assert fast[0] == flask[0] == 200 and fast[1] == flask[1]
    assert fast[2].count(b"data: ") == flask[2].count(b"data: ") > 2

    for payload in ({**CHAT, "model": "no-such-model"},  # the balancer's 404
                    {**CHAT, "model": "../etc"},           # an id llmlb refuses
                    b'{"model": "fake-model", "messages": [',  # not JSON
                    b"[1, 2]"):                            # not an object
        fast, flask = both(server.url, payload)
        assert fast[0] >= 400 and fast == flask, (payload, fast, flask)
    fast, flask = both(server.url, {"model": "no-such-model", "input": "x"},
                       path="/v1/embeddings")
    assert fast[0] == 404 and fast == flask

    # The agents' APIs: an answer translated from the endpoint's chat, a stream, errors in
    # each API's own shape (Anthropic's under /v1/messages)
    said = [{"role": "user", "content": "Hello there"}]
    for path, payload in (("/v1/messages", {"model": "fake-model", "max_tokens": 4,
                                            "messages": said}),
                          ("/v1/messages", {"model": "fake-model", "max_tokens": 4,
                                            "messages": said, "stream": True}),
                          ("/v1/responses", {"model": "fake-model", "input": "Hello"}),
                          ("/v1/responses", {"model": "fake-model", "input": "Hello",
                                             "stream": True, "store": False})):
        fast, flask = both(server.url, payload, path=path,
                           headers={"anthropic-version": "2023-06-01"})
        assert fast[0] == flask[0] == 200 and fast[1] == flask[1], (path, fast, flask)
        if not payload.get("stream"):
            assert json.loads(fast[2]).keys() == json.loads(flask[2]).keys()
        else:
            assert fast[2].count(b"data: ") == flask[2].count(b"data: ") > 2
    for path, payload in (("/v1/messages", {"model": "no-such-model", "max_tokens": 4,
                                            "messages": said}),
                          ("/v1/messages", b"[1, 2]"),
                          ("/v1/responses", {"model": "no-such-model", "input": "x"}),
                          ("/v1/responses", {"model": "fake-model", "input": "x",
                                             "previous_response_id": "resp_nope"})):
        fast, flask = both(server.url, payload, path=path)
        assert fast[0] >= 400 and fast == flask, (path, payload, fast, flask)
        error = json.loads(fast[2])
        assert error["type"] == "error" if path == "/v1/messages" else "error" in error


def test_what_the_fast_way_leaves_to_flask_is_answered_as_before(make_server, fakes) -> None:
    a = fakes("a")
    server = make_server(**FAST)
    assert add(server, "a", a.url).status_code == 201
    body = json.dumps(CHAT).encode()
    # No key, a key refused: Flask's 401s
    status, _, data = post(server.url, body, False, {"Authorization": ""})
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    status, _, data = post(server.url, body, False, {"Authorization": "Bearer sk-nope"})
    assert status == 401 and json.loads(data)["error"]["message"] == "Invalid API key"
    # A body over the limit: 413 in the API's shape
    status, _, data = post(server.url, b" " * (9 * 1024 * 1024), False)
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"

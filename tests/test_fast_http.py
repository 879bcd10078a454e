"""The balancer's gevent worker reads and answers the proxied routes' requests itself
(``llmlb/fast_http.py``, ``llmlb/gunicorn_gevent.py``) and hands every other request to
gunicorn. Tried as a client would: ``llmlb serve --role balancer`` with an endpoint
(``tests/fake_openai.py``) and requests written byte for byte on one connection, then the
``openai`` SDK; and the head reader alone, for what it must leave to gunicorn."""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys

import openai
import pytest
import requests

from llmlb.fast_http import Answer, Heads, Limits, parse_head

from .conftest import Proc, free_port, llmlb_command
from .test_endpoints import add

KEY = b"Authorization: Bearer sk_debug\r\n"
CHAT = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 4}).encode()
STREAM = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}],
                     "max_tokens": 4, "stream": True}).encode()


def post(body: bytes, extra: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: lb\r\n%sContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, KEY, len(body), extra, body))


class _Kept(io.BytesIO):
    def close(self) -> None:  # http.client closes its file after each answer
        pass


class _Replay:
    def __init__(self, data: bytes) -> None:
        self.file = _Kept(data)

    def makefile(self, *_args) -> io.BytesIO:  # noqa: ANN002
        return self.file


def exchange(url: str, data: bytes, answers: int) -> tuple[list, bool]:
    """Send ``data`` (pipelined requests) on one connection and read ``answers`` answers:
    (status, headers, body) each, and whether the server then closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        got, closed = b"", False
        replay = None
        while True:
            replay = _Replay(got)
            try:
                parsed = []
                for _ in range(answers):
                    response = http.client.HTTPResponse(replay)  # type: ignore[arg-type]
                    response.begin()
                    parsed.append((response.status, dict(response.getheaders()),
                                   response.read()))
                if replay.file.read() == b"":
                    break
            except (http.client.IncompleteRead, http.client.RemoteDisconnected,
                    http.client.BadStatusLine, ValueError):
                pass
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the connection closed after {got[-300:]!r}")
            got += chunk
        sock.settimeout(1.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:  # closed with the request's body unread
            closed = True
    return parsed, closed


@pytest.fixture
def balancer(start_process, fakes, llmlb_home) -> tuple[Proc, object]:
    port = free_port()
    proc = start_process([*llmlb_command(), "serve", "--dev", "--role", "balancer", "--port",
                          str(port)], {"LLMLB_MAX_BODY_BYTES": "100000"}, port)
    fake = fakes("a")
    assert add(proc, "a", fake.url).status_code == 201
    return proc, fake


def test_one_connection_carries_every_kind_of_request(balancer) -> None:
    proc, fake = balancer
    get = b"GET /v1/models HTTP/1.1\r\nHost: lb\r\n" + KEY + b"\r\n"
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n" + KEY +
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT))
    answers, closed = exchange(proc.url, post(CHAT) + get + chunked + post(STREAM) +
                               post(CHAT) + post(CHAT, b"Connection: close\r\n") + get, 6)
    statuses = [a[0] for a in answers]
    assert statuses == [200] * 6, answers
    chat, models, by_gunicorn, stream, again, last = answers
    assert json.loads(chat[2])["choices"][0]["message"]["content"]
    assert chat[1]["X-LLMLB-Node"] == "a" and chat[1]["Connection"] == "keep-alive"
    assert chat[1]["Content-Length"] == str(len(chat[2]))
    assert "fake-model" in models[2].decode()
    assert json.loads(by_gunicorn[2])["choices"][0]["message"]["content"]
    assert stream[1]["Transfer-Encoding"] == "chunked"
    assert stream[2].count(b"data: ") > 2 and stream[2].rstrip().endswith(b"data: [DONE]")
    assert json.loads(again[2])["object"] == "chat.completion"
    # "Connection: close" is honoured: the last GET, sent after it, is never answered
    assert last[1]["Connection"] == "close" and closed
    assert len(fake.calls) == 5
    # one access line per request, the ones read here included
    log = proc.log()
    assert log.count('"POST /v1/chat/completions HTTP/1.1" 200') == 5
    assert log.count('"GET /v1/models HTTP/1.1" 200') == 1


def test_the_openai_sdk_streams_and_waits_on_kept_alive_connections(balancer) -> None:
    proc, fake = balancer
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="sk_debug", max_retries=0)
    for _ in range(3):
        answer = client.chat.completions.create(model="fake-model", max_tokens=4,
                                                messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content
        chunks = list(client.chat.completions.create(
            model="fake-model", max_tokens=4, stream=True,
            messages=[{"role": "user", "content": "Hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(fake.calls) == 6
    assert proc.log().count('"POST /v1/chat/completions HTTP/1.1" 200') == 6


def test_what_gunicorn_reads_is_answered_as_before(balancer) -> None:
    proc, fake = balancer
    url = proc.url
    # A repeated Content-Length: gunicorn refuses it, in JSON, and closes
    (answer,), closed = exchange(url, post(CHAT, b"Content-Length: %d\r\n" % len(CHAT)), 1)
    assert answer[0] == 400 and json.loads(answer[2])["error"] and closed
    # A malformed field on the proxied route: gunicorn's 400, in JSON
    (answer,), closed = exchange(url, post(CHAT, b"Bad Field: x\r\n"), 1)
    assert answer[0] == 400
    assert json.loads(answer[2])["error"]["message"].startswith("Malformed HTTP request")
    # A body over LLMLB_MAX_BODY_BYTES: 413 in the API's shape
    (answer,), _ = exchange(url, post(b" " * 100_001, b"Connection: close\r\n"), 1)
    assert answer[0] == 413 and json.loads(answer[2])["error"]["code"] == "request_too_large"
    # Expect: 100-continue is gunicorn's: the interim answer, then the real one
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head, body = post(CHAT, b"Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    # HTTP/1.0, and a field name with an underscore (gunicorn drops it): served by gunicorn
    (answer,), closed = exchange(url, post(CHAT).replace(b"HTTP/1.1", b"HTTP/1.0"), 1)
    assert answer[0] == 200 and closed
    (answer, again), _ = exchange(url, post(CHAT, b"X_Trace: 1\r\n") + post(CHAT), 2)
    assert answer[0] == again[0] == 200
    # A body that ends before its Content-Length: the client is told, in JSON
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(post(CHAT)[:-5])
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == \
        "invalid_request_error"
    assert requests.post(f"{url}/v1/chat/completions", data=CHAT, timeout=30, headers={
        "Authorization": "Bearer sk_debug", "Content-Type": "application/json"}).ok


LIMITS = Limits(line=4094, fields=100, field_size=8190, body=1000)
PLAIN = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer k\r\n"
         b"Content-Type: application/json\r\nContent-Length: 12\r\n\r\n")


def test_the_plain_head_is_read_into_the_environ() -> None:
    head = parse_head(PLAIN, LIMITS, {})
    assert head is not None
    assert (head.path, head.query, head.length, head.close, head.scheme) == \
        ("/v1/chat/completions", "x=1", 12, False, "http")
    assert head.fields == {"HTTP_HOST": "lb", "HTTP_AUTHORIZATION": "Bearer k",
                           "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "12"}
    closing = parse_head(PLAIN.replace(b"Host: lb", b"Connection: Close"), LIMITS, {})
    assert closing is not None and closing.close
    proto = PLAIN.replace(b"Host: lb", b"X-Forwarded-Proto: https")
    secure = {"X-FORWARDED-PROTO": "https"}
    assert parse_head(proto, LIMITS, secure).scheme == "https"
    assert parse_head(proto, LIMITS, {}).scheme == "http"  # an untrusted peer: ignored


@pytest.mark.parametrize("old,new", [
    (b"POST ", b"post "),                                    # a method not the plain one
    (b"POST ", b"GET "),
    (b"HTTP/1.1", b"HTTP/1.0"),
    (b"Host: lb\r\n", b"Host: lb\r\nHost: other\r\n"),        # a repeated field
    (b"Content-Length: 12", b"Content-Length: 12\r\nContent-Length: 13"),
    (b"Content-Length: 12", b"Content-Length: +12"),
    (b"Content-Length: 12", b"Content-Length: 1001"),        # over the body limit
    (b"Content-Length: 12\r\n", b""),                        # no length
    (b"Host: lb", b"X_Host: lb"),                             # gunicorn drops such names
    (b"Host: lb\r\n", b"Host: lb\r\n continued\r\n"),         # obsolete line folding
    (b"Host: lb\r\n", b"Host: lb\nX: y\r\n"),                 # a bare LF
    (b"Host: lb", b"Host: l\x00b"),                           # a control character
    (b"Host: lb", b"Host lb"),
    (b"Host: lb", b"Transfer-Encoding: chunked"),
    (b"Host: lb", b"Expect: 100-continue"),
    (b"Host: lb", b"Upgrade: websocket"),
    (b"/v1/chat/completions", b"/v1/chat%2Fcompletions"),     # decoding is gunicorn's
    (b"/v1/chat/completions", b"/v1/chat/completions#x"),
    (b"/v1/chat/completions", b"/v1/" + b"x" * 4100),        # over limit_request_line
    (b"Host: lb", b"Host: " + b"x" * 8200),                  # over limit_request_field_size
    (b"Host: lb", b"X-A: 1\r\n" * 101 + b"Host: lb"),         # over limit_request_fields
])
def test_any_other_head_is_left_to_gunicorn(old: bytes, new: bytes) -> None:
    assert parse_head(PLAIN, LIMITS, {}) is not None
    assert parse_head(PLAIN.replace(old, new, 1), LIMITS, {}) is None
    # and by a connection whose last head was the plain one (``Heads``)
    heads = Heads()
    assert heads.parse(PLAIN, LIMITS, {}) is not None
    assert heads.parse(PLAIN.replace(old, new, 1), LIMITS, {}) is None


def test_a_head_like_the_last_but_for_its_length_is_read_as_such() -> None:
    heads = Heads()
    assert heads.parse(PLAIN, LIMITS, {}) == parse_head(PLAIN, LIMITS, {})
    for length in (b"345", b"0", b"007", b"1000"):
        head = PLAIN.replace(b"Content-Length: 12", b"Content-Length: " + length)
        again = heads.parse(head, LIMITS, {})
        assert again == parse_head(head, LIMITS, {}) and again.length == int(length)
    closing = PLAIN.replace(b"Host: lb", b"Connection: close")
    assert heads.parse(closing, LIMITS, {}).close  # another head: read anew
    assert not heads.parse(PLAIN, LIMITS, {}).close


def test_scheme_fields_that_disagree_are_left_to_gunicorn() -> None:
    both = PLAIN.replace(b"Host: lb", b"X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off")
    secure = {"X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"}
    assert parse_head(both, LIMITS, secure) is None


def _answer(headers: list[tuple[str, str]], body: list[bytes], close: bool = False) -> bytes:
    answer = Answer()
    answer.start_response("200 OK", headers)
    return b"".join(answer.frames(body, close))


def test_the_answer_is_framed_as_http_1_1() -> None:
    sent = _answer([("Content-Type", "text/plain"), ("Connection", "keep-alive"),
                    ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), ("Server", "node"),
                    ("Content-Length", "5")], [b"hel", b"", b"lo, and more"])
    head, body = sent.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nDate: ")
    # the node's own hop-by-hop fields, Date and Server are dropped, as gunicorn drops them
    assert b"Connection: keep-alive" in head and head.count(b"Connection") == 1
    assert head.count(b"Date: ") == head.count(b"Server: ") == 1 and b"1970" not in head
    assert body == b"hello"  # never past its Content-Length
    streamed = _answer([("Content-Type", "text/event-stream")], [b"data: 1\n\n", b"",
                                                                 b"data: 2\n\n"], close=True)
    head, body = streamed.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" in head
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"


def test_what_an_app_gives_wsgis_write_goes_out_first() -> None:
    answer = Answer()
    write = answer.start_response("200 OK", [("Content-Length", "11")])
    write(b"hello ")
    assert b"".join(answer.frames([b"world"], False)).endswith(b"\r\n\r\nhello world")


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b", "a\x1bb"])
def test_an_answer_field_that_would_break_the_head_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="X-Node"):
        _answer([("Content-Type", "text/plain"), ("X-Node", value)], [b"x"])
    assert _answer([("X-Node", "a\tb")], [b"x"])  # HTAB is allowed


def test_the_hot_paths_locks_are_the_operating_systems_under_gevent() -> None:
    """Under gevent ``threading.Lock`` is gevent's, a lock in Python; the short sections of
    the hot path (the state's cache, the in-flight counters, prometheus' values) take the
    operating system's (``llmlb/os_lock.py``), and a greenlet that takes one, gives the hub a
    turn and takes it again while others do the same never blocks."""
    code = """
from gevent import monkey; monkey.patch_all()
import _thread, threading, gevent
from llmlb import os_lock
lock = os_lock.lock()
print(type(lock).__module__, type(lock).__name__, type(threading.Lock()).__module__)
done = []
def use(n):
    for _ in range(100):
        with lock:
            done.append(n)
        gevent.sleep(0)
gevent.joinall([gevent.spawn(use, n) for n in range(50)], timeout=10)
print(len(done))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[:2] == ["_thread", "lock"]  # the operating system's
    assert out[2].startswith("gevent")     # what threading.Lock is there
    assert out[3] == "5000"

"""The balancer's HTTP/1.1 client (llmlb.balancer.http1) against a real socket server that
answers as scripted: keep-alive reuse, chunks as they come, bodies ended by the connection,
connections the server dropped, and failures that must surface as errors."""

from __future__ import annotations

import gc
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from llmlb.balancer import http1

from .conftest import free_port

Handler = Callable[[socket.socket, bytes], bool]  # (connection, request) -> keep it open?


def read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        body += conn.recv(65536)
    return head


@pytest.fixture
def server() -> Iterator[Callable[[Handler], tuple[str, dict]]]:
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> tuple[str, dict]:
        port = free_port()
        listener = socket.create_server(("127.0.0.1", port))
        listeners.append(listener)
        stats = {"connections": 0, "requests": 0}

        def serve(conn: socket.socket) -> None:
            with conn:
                while (head := read_request(conn)) is not None:
                    stats["requests"] += 1
                    if not handler(conn, head):
                        return

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                stats["connections"] += 1
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{port}", stats

    yield start
    for listener in listeners:
        listener.close()


def pool(url: str, read_timeout: float = 5) -> http1.Pool:
    return http1.Pool(url, maxsize=4, connect_timeout=2, read_timeout=read_timeout)


def fixed(conn: socket.socket, head: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 11\r\n\r\n{\"ok\":true}")
    return True


def test_keep_alive_connections_are_reused(server) -> None:
    url, stats = server(fixed)
    client = pool(url)
    for _ in range(3):
        response = client.request("POST", "/v1/chat/completions", b"{}", {})
        assert response.status == 200 and response.header("content-type") == "application/json"
        assert response.read() == b'{"ok":true}'
    assert stats == {"connections": 1, "requests": 3}


def test_an_answer_leaves_nothing_for_the_garbage_collector(server) -> None:
    """Every proxied request reads an answer: what it made must go with reference counting,
    not wait as a cycle for a collection (the parser and its callbacks once were one, 13
    objects a request)."""
    url, _ = server(fixed)
    client = pool(url)
    assert client.request("POST", "/", b"{}", {}).read() == b'{"ok":true}'  # the connection
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            assert client.request("POST", "/", b"{}", {}).read() == b'{"ok":true}'
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_keep_alive_survives_descriptors_above_1023(server) -> None:
    """A balancer holding a thousand streams has descriptors above select()'s limit: its
    idle connections must still be reused, not replaced one request after another."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        url, stats = server(fixed)
        client = pool(url)
        for _ in range(3):
            assert client.request("POST", "/", b"{}", {}).read() == b'{"ok":true}'
        assert stats == {"connections": 1, "requests": 3}
    finally:
        for fd in spare:
            os.close(fd)


def test_chunks_arrive_as_the_server_sends_them(server) -> None:
    release = threading.Event()

    def chunked(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"8\r\ndata: 1\n\r\n")
        release.wait(5)
        conn.sendall(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        return True

    url, stats = server(chunked)
    client = pool(url)
    chunks = client.request("POST", "/", b"{}", {}).chunks()
    assert next(chunks) == b"data: 1\n"  # before the server sent the rest
    release.set()
    assert list(chunks) == [b"data: 2\n"]
    assert client.request("POST", "/", b"{}", {}).read() == b"data: 1\ndata: 2\n"
    assert stats["connections"] == 1


def test_a_body_ended_by_the_connection(server) -> None:
    def until_close(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        return False

    url, _ = server(until_close)
    assert pool(url).request("GET", "/", None, {}).read() == b"all of it"


def test_a_connection_the_server_closed_is_replaced(server) -> None:
    def one_per_connection(conn: socket.socket, head: bytes) -> bool:
        fixed(conn, head)
        return False  # closes without saying so (no Connection: close)

    url, stats = server(one_per_connection)
    client = pool(url)
    for _ in range(3):
        assert client.request("POST", "/", b"{}", {}).read() == b'{"ok":true}'
        time.sleep(0.05)
    assert stats == {"connections": 3, "requests": 3}

    served = threading.local()

    def drops_the_second(conn: socket.socket, head: bytes) -> bool:
        # The race a keep-alive timeout makes: the connection looked open, the request went
        # out, and the server closed it without an answer. Sent again on a new connection.
        served.n = getattr(served, "n", 0) + 1
        return served.n == 1 and fixed(conn, head)

    url, stats = server(drops_the_second)
    client = pool(url)
    for _ in range(3):
        assert client.request("POST", "/", b"{}", {}).read() == b'{"ok":true}'
    assert stats["connections"] == 3


def test_failures_are_errors_not_answers(server) -> None:
    with pytest.raises(http1.ConnectError, match="cannot connect"):
        pool(f"http://127.0.0.1:{free_port()}").request("GET", "/", None, {})

    def cut(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        return False

    url, _ = server(cut)
    response = pool(url).request("GET", "/", None, {})
    with pytest.raises(http1.HTTPClientError, match="closed before the response ended"):
        response.read()

    def silent(conn: socket.socket, head: bytes) -> bool:
        time.sleep(2)
        return False

    url, _ = server(silent)
    with pytest.raises(http1.HTTPClientError, match="no answer in time"):
        pool(url, read_timeout=0.3).request("GET", "/", None, {})

    def garbage(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(b"SMTP ready\r\n\r\n")
        return False

    url, _ = server(garbage)
    with pytest.raises(http1.HTTPClientError, match="invalid response"):
        pool(url).request("GET", "/", None, {})

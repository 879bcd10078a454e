"""The balancer's HTTP/1.1 client to nodes: keep-alive connections in a pool per node, the
response parsed by ``httptools`` (llhttp, the parser of Node.js and uvicorn), bodies read as
they arrive.

Why not urllib3: on this path every microsecond of the balancer's CPU counts (the goal is
under 1 ms added per request and 1,000 requests/s on one core, upstream included). A round
trip through urllib3 costs about 250 µs of CPU, most of it in ``http.client``'s header parsing
through the ``email`` package; a socket with llhttp costs about 40 µs (bench/balancer.py
measures both). What is left here is only what a client must do around the parser: build the
request, keep connections, notice a dead one, and hand the body on chunk by chunk.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlsplit

import httptools

from ..disconnect import INTERVAL, peer_closed, readable_now

READ_SIZE = 64 * 1024
FRESH_SECONDS = 1.0  # an idle connection younger than this is reused without a look


class HTTPClientError(Exception):
    """The connection failed or the peer broke the protocol; no answer is to be had."""


class ConnectError(HTTPClientError):
    """The connection could not be made (refused, unreachable, timed out)."""


class ClientGone(HTTPClientError):
    """The client the request is made for closed its own connection while the answer was
    awaited; this connection was dropped, so that the peer stops working on it."""


class _Dropped(HTTPClientError):
    """The connection closed or reset before any answer: on a reused connection, the peer
    closed it as it was reused, and the request can be sent again on a new one."""


class _Parsed:
    """httptools' callbacks, collected."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.headers_done = False
        self.keep_alive = False
        self.done = False
        self.body: list[bytes] = []
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # Asked now: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        # Let go of the parser (the caller holds it): it holds this object's methods, and
        # the pair would be a cycle that only the garbage collector frees.
        self.parser = None

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class Response:
    """A response whose status and headers are in; the body is read with ``read()`` or
    ``chunks()``. ``close()`` before the end drops the connection (the peer sees it)."""

    def __init__(self, pool: Pool, sock: socket.socket, parser: httptools.HttpResponseParser,
                 parsed: _Parsed) -> None:
        self._pool, self._sock, self._parser, self._parsed = pool, sock, parser, parsed
        self.status = parser.get_status_code()
        self.headers = parsed.headers
        self.closed = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives (chunked transfer decoded)."""
        parsed = self._parsed
        while True:
            if parsed.body:
                pending, parsed.body = parsed.body, []
                yield from pending
            if parsed.done:
                self._finish()
                return
            try:
                data = self._sock.recv(READ_SIZE)
            except OSError as exc:
                self.close()
                raise HTTPClientError(f"connection lost: {exc}") from exc
            if not data:
                self.close()
                if self._delimited_by_close():
                    return  # a body without length or chunks ends with the connection
                raise HTTPClientError("the connection closed before the response ended")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.close()
                raise HTTPClientError(f"invalid response: {exc}") from exc

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def _delimited_by_close(self) -> bool:
        return self.header("Content-Length") is None and "chunked" not in (
            self.header("Transfer-Encoding") or "").lower()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            if self._parsed.keep_alive:
                self._pool._put(self._sock)
            else:
                self._sock.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()


class Pool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://...``)."""

    def __init__(self, url: str, *, maxsize: int, connect_timeout: float,
                 read_timeout: float) -> None:
        parts = urlsplit(url)
        self.scheme, self.host = parts.scheme, parts.hostname or "localhost"
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1].encode("idna")
        self.maxsize, self.connect_timeout, self.read_timeout = (
            maxsize, connect_timeout, read_timeout)
        self._idle: deque[tuple[socket.socket, float]] = deque()  # (connection, back since)
        self._tls = ssl.create_default_context() if self.scheme == "https" else None

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str], client: socket.socket | None = None) -> Response:
        """Send a request; return once the status and headers are in. ``client``: the
        connection of the client it is made for; ClientGone when that closes first."""
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self.host_header]
        head += [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
        head.append(b"Content-Length: %d" % len(body or b""))
        data = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
        sock, reused = self._get()
        try:
            return self._exchange(sock, data, client)
        except _Dropped:
            if not reused:
                raise
        # A kept-alive connection the peer closed just as it was reused: once more, anew.
        return self._exchange(self._connect(), data, client)

    def close(self) -> None:
        while True:
            try:
                self._idle.pop()[0].close()
            except IndexError:
                return

    # --- internals ----------------------------------------------------------------------------

    def _exchange(self, sock: socket.socket, data: bytes,
                  client: socket.socket | None = None) -> Response:
        try:
            sent = sock.send(data)  # most requests fit the socket's buffer: one call
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        except TimeoutError as exc:
            sock.close()
            raise HTTPClientError("the request could not be sent in time") from exc
        except OSError as exc:
            sock.close()
            raise _Dropped(f"connection lost: {exc.strerror or exc}") from exc
        parsed = _Parsed()
        parser = parsed.parser
        received = False
        while not parsed.headers_done:
            try:
                if client is not None:
                    chunk, client = self._receive(sock, client)
                else:
                    chunk = sock.recv(READ_SIZE)
            except TimeoutError as exc:
                sock.close()
                raise HTTPClientError("no answer in time") from exc
            except OSError as exc:
                sock.close()
                error = HTTPClientError if received else _Dropped
                raise error(f"connection lost: {exc.strerror or exc}") from exc
            if not chunk:
                sock.close()
                if received:
                    raise HTTPClientError("the connection closed in the middle of the answer")
                raise _Dropped("the connection closed without an answer")
            received = True
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                sock.close()
                raise HTTPClientError(f"invalid response: {exc}") from exc
        return Response(self, sock, parser, parsed)

    def _receive(self, sock: socket.socket,
                 client: socket.socket) -> tuple[bytes, socket.socket | None]:
        """The next bytes of the answer, looking at ``client`` every ``INTERVAL`` seconds
        while they are awaited: ClientGone when it left, TimeoutError after the read timeout.
        Returned with them, the client to go on watching: None once it sent more (it is
        still there, and its bytes are not ours to read).

        A receive with a short timeout rather than a poll of both sockets: most answers come
        within the first interval, and then this costs one receive (a poll object, under
        gevent, costs more than the rest of the wait)."""
        deadline = time.monotonic() + self.read_timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                sock.settimeout(min(INTERVAL, left))
                try:
                    return sock.recv(READ_SIZE), client
                except TimeoutError:
                    if client is None:
                        continue
                closed = peer_closed(client)
                if closed:
                    sock.close()
                    raise ClientGone("the client closed its connection")
                if closed is None:
                    client = None
        finally:
            if sock.fileno() >= 0:
                sock.settimeout(self.read_timeout)

    def _get(self) -> tuple[socket.socket, bool]:
        while True:
            try:
                sock, since = self._idle.pop()  # deque.pop/append are atomic: no lock
            except IndexError:
                return self._connect(), False
            # A connection back for less than a second is taken as it is: a peer that closed it
            # meanwhile (rare so soon) makes the request fail before any answer, and it is sent
            # again on a new one (``_Dropped``); the look costs a system call per request.
            if time.monotonic() - since < FRESH_SECONDS or _alive(sock):
                return sock, True
            sock.close()

    def _put(self, sock: socket.socket) -> None:
        if len(self._idle) < self.maxsize:  # two threads at once may both add: a bound, loose
            self._idle.append((sock, time.monotonic()))
            return
        sock.close()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        except TimeoutError as exc:
            raise ConnectError(f"no connection to {self.host}:{self.port} in time") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: "
                               f"{exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise ConnectError(f"TLS with {self.host}:{self.port} failed: {exc}") from exc
        sock.settimeout(self.read_timeout)
        return sock


def _alive(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection is still usable: nothing to read on it (a peer
    that closed it makes it readable, with EOF)."""
    try:
        return not readable_now(sock)
    except (OSError, ValueError):
        return False

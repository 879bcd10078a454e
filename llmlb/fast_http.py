"""HTTP/1.1 for the proxied routes, read and written by the gevent worker itself (issue 20).

gunicorn spends more CPU on one proxied request than llmlb does: its parser, its ``Request``
and ``Response`` objects, the environ built header by header, the head and body written in two
sends (bench/balancer.py's profile: 42% of the samples, against 20% for the request to the
node). A balancer's traffic is nearly all one shape: ``POST`` of a JSON body with a
``Content-Length`` to a handful of paths, from clients (or nginx) that speak plain HTTP/1.1.
That shape, and only that shape, is read here: the head matched whole by one regular
expression, the environ built in one pass, the answer's head and a whole body sent together.

Anything else is not parsed here at all: ``parse_head`` answers None and the worker hands the
bytes it read to gunicorn, which serves that request exactly as before (its own checks, its
errors, WebSockets, HTTP/1.0, chunked bodies, ``Expect``, ``Transfer-Encoding``…). So the rules
here are only ever stricter than gunicorn's: a request that gunicorn would refuse, or would read
differently, never matches. In particular a head with a repeated field, a field name with an
underscore (gunicorn drops those), a bare CR or LF, obsolete line folding, a control character,
or a line over gunicorn's limits goes to gunicorn.
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from gunicorn import util
from gunicorn.http.message import TOKEN_RE

_TOKEN = rb"[!#$%&'*+.^`|~0-9A-Za-z-]+"  # RFC 9110's token, less "_" (see above)
# The whole head: "POST <target> HTTP/1.1", then "<name>:<value>" lines; a value holds no
# control character but HTAB (so no CR or LF: a field cannot run into the next line).
_HEAD = re.compile(rb"POST (/[!-~]*) HTTP/1\.1\r\n((?:" + _TOKEN +
                   rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n")
# Request fields that change how the message is framed or answered: gunicorn's business.
_NOT_HERE = frozenset({"HTTP_TRANSFER_ENCODING", "HTTP_EXPECT", "HTTP_UPGRADE", "HTTP_TE",
                       "HTTP_HTTP2_SETTINGS"})

_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but HTAB


class Limits(NamedTuple):
    """gunicorn's limits on a head (``limit_request_*``; 0: none), and the largest body."""

    line: int
    fields: int
    field_size: int
    body: int


class Head(NamedTuple):
    """A request head read here: the path, the query, the WSGI variables of its fields, the
    body's length, and whether the client asked to close the connection after it."""

    path: str
    query: str
    target: str
    fields: dict[str, str]
    length: int
    close: bool
    scheme: str


@functools.lru_cache(maxsize=4096)  # a client sends the same lines request after request
def _field(line: str) -> tuple[str, str]:
    """A field's line as its WSGI variable and value."""
    name, _, value = line.partition(":")
    return "HTTP_" + name.upper().replace("-", "_"), value.strip(" \t")


def parse_head(head: bytes, limits: Limits, secure: dict[str, str]) -> Head | None:
    """The head (up to and with its empty line) when it is the plain shape read here, else
    None. ``secure``: gunicorn's ``secure_scheme_headers`` when the peer is trusted to set
    them (``forwarded_allow_ips``), else empty."""
    match = _HEAD.fullmatch(head)
    if match is None:
        return None
    target = match.group(1).decode("ascii")
    if limits.line and len(target) + 14 > limits.line:  # "POST " + target + " HTTP/1.1"
        return None
    lines = match.group(2).decode("latin-1").split("\r\n")
    lines.pop()  # after the last CRLF
    if limits.fields and len(lines) > limits.fields:
        return None
    if limits.field_size and max(map(len, lines)) > limits.field_size:
        return None
    fields = dict(map(_field, lines))
    if len(fields) != len(lines) or not _NOT_HERE.isdisjoint(fields):
        return None  # a repeated field (how to join it, whether it may repeat: gunicorn's)
    length = fields.pop("HTTP_CONTENT_LENGTH", "")
    if not (length.isascii() and length.isdigit()) or int(length) > limits.body:
        return None
    fields["CONTENT_LENGTH"] = length
    if "HTTP_CONTENT_TYPE" in fields:
        fields["CONTENT_TYPE"] = fields.pop("HTTP_CONTENT_TYPE")
    scheme = None
    for name, wanted in secure.items() if secure else ():
        value = fields.get("HTTP_" + name.replace("-", "_"))
        if value is not None:
            said = "https" if value == wanted else "http"
            if scheme is not None and said != scheme:
                return None  # two scheme fields that disagree: gunicorn refuses the request
            scheme = said
    path, _, query = target.partition("?")
    if "%" in path or "#" in target:
        return None  # decoding and fragments: gunicorn's
    close = "close" in fields.get("HTTP_CONNECTION", "").lower()
    return Head(path, query, target, fields, int(length), close, scheme or "http")


# A Content-Length field's digits, whatever the name's case (a client's next head is often
# its last one but for these)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n", re.IGNORECASE)


class Heads:
    """The heads of one connection. A client sends the same head request after request but
    for its Content-Length (its key, its Host, its SDK's fields): a head equal to the last one
    read but for those digits is that head with the new length, without reading it again (a
    full read is ~5% of a proxied request's CPU). Anything else is read by ``parse_head``;
    since the rest of the bytes are the same, so is every check it made."""

    __slots__ = ("_key", "_head")

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._head: Head | None = None

    def parse(self, head: bytes, limits: Limits, secure: dict[str, str]) -> Head | None:
        """``parse_head(head, limits, secure)``, for a connection whose ``limits`` and
        ``secure`` stay the same."""
        found = _LENGTH.search(head)
        if found is None:
            return parse_head(head, limits, secure)
        key = head[:found.start(1)] + head[found.end(1):]
        last = self._head
        if key == self._key and last is not None:
            digits = found.group(1).decode("ascii")
            length = int(digits)
            if length > limits.body:
                return None  # gunicorn's (413), as ``parse_head`` says
            fields = last.fields.copy()
            fields["CONTENT_LENGTH"] = digits
            return Head(last.path, last.query, last.target, fields, length, last.close,
                        last.scheme)
        parsed = parse_head(head, limits, secure)
        if parsed is not None:
            self._key, self._head = key, parsed
        return parsed


_date = (0, "")


def http_date() -> str:
    """gunicorn's Date field, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, util.http_date(now))
    return _date[1]


@functools.lru_cache(maxsize=4096)  # an answer's fields repeat answer after answer
def _line(name: str, value: str) -> tuple[str, int | None]:
    """One field of the answer, checked: its line as written ("" for the server's own) and,
    for Content-Length, the length. ValueError for a name that is not a token or a value with
    a control character but HTAB (a CR or LF would start a field of its own)."""
    if not isinstance(name, str) or not TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid header name {name!r} in the answer")
    if not isinstance(value, str) or _BAD_VALUE.search(value):
        raise ValueError(f"invalid value of header {name!r} in the answer")
    # Hop-by-hop fields, Date and Server are the server's, never the app's: gunicorn's
    # list, so an answer read here has the fields it would have from gunicorn.
    lower = name.lower()
    if lower in util.hop_headers:
        return "", None
    return (f"{name}: {value}\r\n",
            int(value.strip(" \t")) if lower == "content-length" else None)


class Answer:
    """The WSGI ``start_response`` of one request, and the head it makes: ``sent`` counts
    the body's bytes (the access log's ``%(b)s``), ``status`` is the app's status line."""

    __slots__ = ("status", "headers", "length", "sent", "close", "chunked", "head_sent",
                 "written")

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.sent = 0
        self.close = False
        self.chunked = False
        self.head_sent = False
        self.written: list[bytes] = []  # what the app gave WSGI's write() callable

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and self.head_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self.status, self.headers = status, headers
        # WSGI's write(), for apps that still use it (PEP 3333 allows no more than this):
        # its bytes go out first, once the app has returned
        return self.written.append

    def head(self, close: bool) -> bytes:
        """The answer's head; ``close``: the connection ends after this answer."""
        self.length = None
        lines = []
        for name, value in self.headers:
            line, length = _line(name, value)
            lines.append(line)
            if length is not None:
                self.length = length
        fields = "".join(lines)
        code = self.status[:3]
        self.chunked = self.length is None and code not in ("204", "304") \
            and not code.startswith("1")
        self.close = close
        return (f"HTTP/1.1 {self.status}\r\nServer: gunicorn\r\nDate: {http_date()}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n"
                + ("Transfer-Encoding: chunked\r\n" if self.chunked else "")
                + fields + "\r\n").encode("latin-1")

    def frames(self, body: Iterable[bytes], close: bool) -> Iterable[bytes]:
        """What to send for ``body``: the head with the first piece, then each piece (framed
        when chunked; never past a Content-Length), the last chunk's marker at the end. The
        head waits for the first piece: an app may call ``start_response`` that late."""
        head = b""
        for piece in itertools.chain(self.written, body):
            if not piece:
                continue
            if not self.head_sent:
                head = self.head(close)
                self.head_sent = True
            if self.length is not None:
                piece = piece[:self.length - self.sent]
                if not piece:
                    continue
            self.sent += len(piece)
            if self.chunked:
                piece = b"%X\r\n%s\r\n" % (len(piece), piece)
            if head:
                piece, head = head + piece, b""
            yield piece
        if not self.head_sent:
            head = self.head(close)
            self.head_sent = True
        end = b"0\r\n\r\n" if self.chunked else b""
        if head or end:
            yield head + end
        if self.length is not None and self.sent < self.length:
            self.close = True  # the app sent less than it said: the connection cannot go on

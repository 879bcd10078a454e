"""The gevent worker of a balancer: gunicorn's, with its own error answers (a URL over the
limit, a malformed request) as JSON like every other error (see ``gunicorn_worker.py``), and
its own reading and writing of the proxied routes' requests (``fast_http.py``).

Each connection is read here first. A request of the proxied routes' plain shape (``POST`` to
one of ``api.fastpath.ROUTES`` with a ``Content-Length`` within the body limit, HTTP/1.1) is
read, handed to the app and answered here; any other request goes to gunicorn with the bytes
already read, gunicorn serves it as it serves every request, and the connection comes back
here for the next one. TLS, HTTP/2, the PROXY protocol and unix sockets stay gunicorn's from
the start.

A module of its own: importing it imports gevent, which a gthread llmlb never needs.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import ssl
import time
from datetime import timedelta
from typing import Any

import gevent
from gunicorn import http
from gunicorn.http.message import _ip_in_allow_list
from gunicorn.http.wsgi import base_environ
from gunicorn.workers import ggevent

from .api.fastpath import ROUTES
from .fast_http import Answer, Heads, Limits
from .gunicorn_worker import JSONErrors

READ_SIZE = 64 * 1024
HEAD_MAX = 64 * 1024  # the longest head worth waiting for here; a longer one is gunicorn's


class _Line:
    """What gunicorn's access log and error answer read of a request read here."""

    __slots__ = ("method", "uri", "path", "query", "version", "headers")

    def __init__(self, path: str, query: str, target: str) -> None:
        self.method, self.uri, self.path, self.query = "POST", target, path, query
        self.version = (1, 1)
        self.headers: list[tuple[str, str]] = []


class GeventWorker(JSONErrors, ggevent.GeventWorker):
    """``worker_class = "llmlb.gunicorn_gevent.GeventWorker"``."""

    _fast: dict[str, Any] | None = None

    def handle(self, listener, client, addr):  # noqa: ANN001, ANN201
        fast = self._fast_settings()
        if not fast or not isinstance(addr, tuple) or isinstance(client, ssl.SSLSocket):
            return super().handle(listener, client, addr)
        client.setblocking(1)
        try:
            self._serve(listener, client, addr, fast)
        except OSError as e:  # as gunicorn: a client that left is no error
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except (gevent.GreenletExit, SystemExit):
            pass
        except BaseException as e:  # noqa: BLE001 - answered (JSON 500) and logged by gunicorn
            self.handle_error(None, client, addr, e)
        finally:
            with contextlib.suppress(OSError):
                client.close()
        return None

    def _fast_settings(self) -> dict[str, Any]:
        """What reading requests here needs, worked out once; empty when the configuration
        asks for something only gunicorn does (HTTP/2, the PROXY protocol, TLS, a
        SCRIPT_NAME prefix)."""
        if self._fast is None:
            cfg = self.cfg
            runtime = getattr(self.wsgi, "extensions", {}).get("llmlb")
            if runtime is None or cfg.is_ssl or "h2" in str(cfg.http_protocols) \
                    or getattr(cfg, "http2_cleartext", "off") not in ("off", None, False) \
                    or str(cfg.proxy_protocol) not in ("off", "False") \
                    or os.environ.get("SCRIPT_NAME") or not cfg.keepalive:
                self._fast = {}
            else:
                environ = base_environ(cfg)
                environ["wsgi.multithread"] = True
                self._fast = {
                    "limits": Limits(cfg.limit_request_line, cfg.limit_request_fields,
                                     cfg.limit_request_field_size,
                                     runtime.settings.server.max_body_bytes),
                    "environ": environ,
                    "keepalive": float(cfg.keepalive),
                }
        return self._fast

    def _serve(self, listener: Any, client: Any, addr: tuple, fast: dict[str, Any]) -> None:
        listener_name = listener.getsockname()
        limits, keepalive = fast["limits"], fast["keepalive"]
        # The environ's part that is the same for every request of this connection
        base = {**fast["environ"], "gunicorn.socket": client, "REQUEST_METHOD": "POST",
                "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": addr[0],
                "REMOTE_PORT": str(addr[1]), "SERVER_NAME": str(listener_name[0]),
                "SERVER_PORT": str(listener_name[1]), "SCRIPT_NAME": ""}
        secure = self.cfg.secure_scheme_headers if _ip_in_allow_list(
            addr[0], self.cfg.forwarded_allow_ips, self.cfg.forwarded_allow_networks()) else {}
        heads = Heads()
        buf = b""
        while True:
            # the next head, within the keep-alive time (gunicorn's rule for every head)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                deadline = time.monotonic() + keepalive
                while end < 0 and len(buf) < HEAD_MAX:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    client.settimeout(left)
                    try:
                        data = client.recv(READ_SIZE)
                    except TimeoutError:
                        return
                    finally:
                        client.settimeout(None)
                    if not data:
                        return
                    buf += data
                    end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(data) - 3))
            head = heads.parse(buf[:end + 4], limits, secure) \
                if end >= 0 and buf.startswith(b"POST ") else None
            if head is None or head.path not in ROUTES:
                rest = self._by_gunicorn(listener_name, client, addr, buf)
                if rest is None:
                    return
                buf = rest
                continue
            start, need = end + 4, end + 4 + head.length
            if len(buf) < need:
                parts, have = [buf], len(buf)
                while have < need:
                    data = client.recv(max(READ_SIZE, min(need - have, 1 << 20)))
                    if not data:  # the body ends short: gunicorn (and the app) say so
                        self._by_gunicorn(listener_name, client, addr, b"".join(parts))
                        return
                    parts.append(data)
                    have += len(data)
                buf = b"".join(parts)
            body, buf = buf[start:need], buf[need:]
            if not self._answer(head, body, client, base):
                return
            gevent.sleep(0)  # a turn for the other connections (see handle_request)

    def _answer(self, head: Any, body: bytes, client: Any, base: dict) -> bool:
        """Serve one request read here; whether the connection goes on."""
        environ = base.copy()
        environ.update(head.fields)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["QUERY_STRING"] = head.query
        environ["RAW_URI"] = head.target
        environ["PATH_INFO"] = head.path
        environ["wsgi.url_scheme"] = head.scheme
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        close = head.close or not self.alive
        answer = Answer()
        began = time.perf_counter()
        respiter = self.wsgi(environ, answer.start_response)
        try:
            try:
                for data in answer.frames(respiter, close):
                    # send first: gevent's sendall asks the socket its buffer size each time
                    sent = client.send(data)
                    if sent < len(data):
                        client.sendall(memoryview(data)[sent:])
            except OSError:
                raise
            except Exception:
                if not answer.head_sent:
                    raise  # gunicorn answers it (a JSON 500) and closes
                self.log.exception("Error handling request")
                return False  # the answer has begun: all that can be done is to end it
        finally:
            self.log.access(answer, _Line(head.path, head.query, head.target), environ,
                            timedelta(seconds=time.perf_counter() - began))
            if hasattr(respiter, "close"):
                respiter.close()
        return not answer.close

    def _by_gunicorn(self, listener_name: Any, client: Any, addr: tuple,
                     pending: bytes) -> bytes | None:
        """One request served by gunicorn, ``pending`` being what was read of it (and maybe
        more); what was read past it, or None when the connection is to end."""
        parser = http.get_parser(self.cfg, client, addr)
        parser.unreader.unread(pending)
        req = None
        try:
            with self.timeout_ctx():
                req = next(parser)
            if not req:
                return None
            self.handle_request(listener_name, req, client, addr)
            if req.body is not None:  # what the app left unread of the body
                while req.body.read(READ_SIZE):
                    pass
        except http.errors.NoMoreData as e:
            self.log.debug("Ignored premature client disconnection. %s", e)
            return None
        except StopIteration as e:
            self.log.debug("Closing connection. %s", e)
            return None
        except (ssl.SSLError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a request gunicorn refuses: its answer, as JSON
            self.handle_error(req, client, addr, e)
            return None
        if not self.alive:
            return None
        return parser.unreader.take_buffered()

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201
        handled = super().handle_request(listener_name, req, sock, addr)
        # A kept-alive connection whose next request is already in (the client sent it while
        # this one's access log, metrics and history were written) would be served at once,
        # without a turn of the hub: under saturation a few connections then take every
        # turn and the others wait seconds (64 streaming connections: p99 1.1 s, ~30 past
        # wrk's 2 s timeout). Each request ends with a turn for the others instead.
        gevent.sleep(0)
        return handled

"""The WSGI fast path of the proxied inference routes (issue 20, part 1): ``POST
/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, and the agents' APIs
(``/v1/messages``, its ``count_tokens``, ``/v1/responses``) with an API key go
straight from the WSGI server to the balancer, without Flask's request context, URL map,
session interface, hooks and ``Response`` object, which cost more CPU than forwarding itself
(bench/balancer.py's profile).

The answer is the one Flask gives (``openai_routes`` stays the reference, and serves whatever
the fast path hands on): the same status, headers (the node's, ``X-LLMLB-Node``, the security
headers, ``X-LLMLB-Worker``) and bytes, errors in the same JSON. Whatever is not the plain
case goes to Flask untouched: no key (a dashboard session), a key refused or without the
``api`` scope (Flask says why), a body without a Content-Length or above the limit, a balancer
asking who answers (``X-LLMLB-Instance``), any other method or path. A body that ends before
its Content-Length goes to Flask too, with what arrived, so that it says so as it always did.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

from .. import auth, errors
from ..balancer.providers import ANTHROPIC_HEADERS
from ..balancer.proxy import Forwarded
from ..balancer.upstream import CHAT, COMPLETION, EMBEDDINGS
from ..dialects import ANTHROPIC, COUNT_TOKENS, MESSAGES, RESPONSES, error_body
from ..disconnect import ClientWatch
from ..runtime import Runtime
from .common import Passthrough, forward_as
from .security_headers import HEADERS

log = logging.getLogger(__name__)

# path: (operation, whether the client's leaving stops the answer)
ROUTES = {"/v1/chat/completions": (CHAT, True), "/v1/completions": (COMPLETION, True),
          "/v1/embeddings": (EMBEDDINGS, False), "/v1/messages": (MESSAGES, True),
          "/v1/messages/count_tokens": (COUNT_TOKENS, True), "/v1/responses": (RESPONSES, True)}
# The client's headers a hosted provider reads, as the WSGI environ names them
_ANTHROPIC_ENVIRON = tuple((name, "HTTP_" + name.upper().replace("-", "_"))
                           for name in ANTHROPIC_HEADERS)
_TEXT = ("Content-Type", "text/plain; charset=utf-8")  # werkzeug's, when a node names none
_OURS = frozenset(name.lower() for name in (*HEADERS, "X-LLMLB-Worker", "X-LLMLB-Node",
                                            "Content-Length"))

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class FastPath:
    """WSGI middleware in front of Flask (``app.wsgi_app``)."""

    def __init__(self, inner: WSGIApp, rt: Runtime, limit: int, worker: str,
                 dumps: Callable[..., str], skip_header: str) -> None:
        self.inner, self.rt, self.limit, self.dumps = inner, rt, limit, dumps
        self.fixed = [*HEADERS.items(), ("X-LLMLB-Worker", worker)]
        self.skip = "HTTP_" + skip_header.upper().replace("-", "_")

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        route = ROUTES.get(environ.get("PATH_INFO", ""))
        if route is None or environ.get("REQUEST_METHOD") != "POST" or self.skip in environ \
                or "HTTP_TRANSFER_ENCODING" in environ:
            return self.inner(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return self.inner(environ, start_response)
        key = auth.key_from_headers(_Headers(environ))
        if key is None or not 0 <= length <= self.limit:
            return self.inner(environ, start_response)
        try:
            principal = self.rt.authenticator.principal(key)
        except (errors.APIError, errors.StateUnavailable):  # Flask answers these, as ever
            return self.inner(environ, start_response)
        if not principal.allows("api"):
            return self.inner(environ, start_response)
        raw = environ["wsgi.input"].read(length) if length else b""
        if len(raw) < length:  # the client stopped short: Flask says so, as before
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.inner(environ, start_response)
        operation, watch = route
        client = ClientWatch.of(environ) if watch else None
        try:
            if operation == RESPONSES and self.rt.responses is not None:
                forwarded = self.rt.responses.create(raw, principal, client)  # kept here
            else:
                headers = tuple((name, environ[key]) for name, key in _ANTHROPIC_ENVIRON
                                if key in environ) if operation in ANTHROPIC else ()
                forwarded = forward_as(self.rt, principal, operation, raw, client, headers)
        except Exception as exc:  # noqa: BLE001 - answered as Flask's error handlers do
            err = errors.from_exception(exc)
            if err.code == "internal_error":
                log.exception("Unhandled error on POST %s", environ.get("PATH_INFO"))
            return self._error(operation, err, start_response)
        return self._relay(forwarded, start_response)

    def _relay(self, forwarded: Forwarded, start_response: Callable) -> Iterable[bytes]:
        answer = forwarded.response
        headers = [h for h in answer.headers if h[0].lower() not in _OURS]
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(_TEXT)
        if forwarded.node:
            headers.append(("X-LLMLB-Node", forwarded.node))
        headers += self.fixed
        if isinstance(answer.body, bytes):
            answer.close()
            headers.append(("Content-Length", str(len(answer.body))))
            start_response(_status(answer.status), headers)
            return [answer.body]
        start_response(_status(answer.status), headers)
        return Passthrough(answer.body, answer.close)

    def _error(self, operation: str, err: errors.APIError,
               start_response: Callable) -> Iterable[bytes]:
        body = (self.dumps(error_body(operation, err), separators=(",", ":")) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *err.headers.items(), *self.fixed]
        start_response(_status(err.status), headers)
        return [body]


def _status(code: int) -> str:
    return f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}"


class _Headers:
    """The two headers a key may come in, read from the WSGI environ."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict) -> None:
        self.environ = environ

    def get(self, name: str, default: Any = None) -> Any:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), default)

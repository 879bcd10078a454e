"""Flask's signed-cookie sessions, left closed for ``/v1`` calls that carry an API key.

Such a call is authenticated by its key and never reads or writes the session (see
``common.current_principal``), yet Flask would build the cookie's signing serializer and look
for a cookie on every one of them: about a fifth of the CPU the balancer spends on a proxied
request (bench/balancer.py's one-core setup). The dashboard (cookie, no key) is unaffected.
"""

from __future__ import annotations

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from ..auth import key_from_headers


class KeyedCallSessions(SecureCookieSessionInterface):
    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path.startswith("/v1/") and key_from_headers(request.headers):
            return self.make_null_session(app)  # type: ignore[return-value]
        return super().open_session(app, request)

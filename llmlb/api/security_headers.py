"""Security headers on every response (SC-6).

The dashboard loads only its own scripts and styles from ``/static`` (no inline script or
style, no CDN), so the policy allows nothing but the same origin; it may not be framed
(clickjacking), browsers must not guess content types, and no URL leaks to other sites in a
Referer. The JSON API gets the same headers: harmless there, and one rule is simpler. They
are set on every response, whatever a node or endpoint whose answer is relayed sent (SC-8).
"""

from __future__ import annotations

from flask import Flask, Response

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",  # fetch() and the dashboard's WebSocket to its own host
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}


def init_app(app: Flask) -> None:
    @app.after_request
    def add_security_headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers[name] = value
        return response

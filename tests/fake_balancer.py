"""A hostile balancer for tests: a tiny HTTP server on loopback that answers a node's
manifest and blob requests as it is told (names, sizes, redirects, extra bytes)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = b"#!/bin/sh\necho pwned\n"


class LoopbackServer:
    """A threaded HTTP server on ``host`` answering every GET with ``answer(handler)``."""

    def __init__(self, answer, host: str = "127.0.0.1") -> None:  # noqa: ANN001
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200,
         length: int | None = None, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


class FakeBalancer(LoopbackServer):
    """Answers ``/v0/models/registry/{model}/manifest.json`` with ``files`` and every other
    path (the blobs) with ``blob(handler)``: PAYLOAD by default."""

    def __init__(self) -> None:
        self.files: list[dict] = []
        self.blob_requests: list[str] = []
        self.blob = lambda handler: send(handler, PAYLOAD, length=len(PAYLOAD))
        super().__init__(self._answer)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.endswith("/manifest.json"):
            body = json.dumps({"model_id": "evil", "repo": None, "files": self.files,
                               "created_at": None}).encode()
            send(handler, body, length=len(body))
        else:
            self.blob_requests.append(handler.path)
            self.blob(handler)

    def manifest(self, *names: str, size: int = len(PAYLOAD)) -> None:
        self.files = [{"filename": name, "format": "gguf", "size_bytes": size,
                       "url": f"{self.url}/v1/models/blob/evil/model.gguf"} for name in names]

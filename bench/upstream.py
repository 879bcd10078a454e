"""A minimal OpenAI-compatible upstream for the balancer benchmark: asyncio, HTTP/1.1
keep-alive, no framework, so that it costs the core it shares with the proxy as little as
possible.

- ``POST /v1/chat/completions`` answers one fixed ``chat.completion`` at once, or, with
  ``"stream": true``, ``--tokens`` SSE chunks ``--token-delay`` seconds apart (chunked), ending
  with ``data: [DONE]``.
- ``GET /v1/models`` lists ``bench-model`` (what the balancer checks of an endpoint); any
  other ``GET`` answers ``{"status":"ok"}``; any other ``POST`` is a 404, as a server that
  speaks only chat completions answers ``/v1/responses`` or ``/v1/messages``.

Run: ``python bench/upstream.py --port 9101 [--tokens 20 --token-delay 0.5]``; it prints
``ready`` when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json

COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}, separators=(",", ":")).encode()
HEALTH = b'{"status":"ok"}'
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
             b"Content-Length: 22\r\n\r\n" + b'{"detail":"Not Found"}')


def response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


FIXED = response(COMPLETION)
HEALTHY = response(HEALTH)
MODELS = response(json.dumps({"object": "list", "data": [
    {"id": "bench-model", "object": "model", "created": 0, "owned_by": "bench"}]}).encode())


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse_token(i: int) -> bytes:
    payload = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
               "created": 1700000000, "model": "bench-model",
               "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "logprobs": None,
                            "finish_reason": None}]}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Upstream(asyncio.Protocol):
    tokens = 20
    token_delay = 0.5

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.buffer = b""
        self.streaming = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            if head.startswith(b"GET /v1/models"):
                self.transport.write(MODELS)
            elif head.startswith(b"GET"):
                self.transport.write(HEALTHY)
            elif not head.startswith(b"POST /v1/chat/completions "):
                self.transport.write(NOT_FOUND)
            elif b'"stream":true' in body.replace(b" ", b""):
                self.streaming = True
                asyncio.ensure_future(self.stream())
            else:
                self.transport.write(FIXED)

    async def stream(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(self.tokens):
            if self.transport.is_closing():
                return
            self.transport.write(chunk(sse_token(i)))
            await asyncio.sleep(self.token_delay)
        self.transport.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.streaming = False
        if self.buffer:
            self.data_received(b"")


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port,
                                                            backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.5)
    args = parser.parse_args()
    Upstream.tokens, Upstream.token_delay = args.tokens, args.token_delay
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()

"""A minimal OpenAI-compatible server, as vLLM or Ollama would stand behind llmlb as an
endpoint: ``GET {prefix}/models``, chat and completions (streamed with a delay per token, usage
when asked), embeddings, a vLLM-style Prometheus ``/metrics``, and fault modes (500, a cut
connection, a hang, 429 with Retry-After, an HTML error page). ``prefix`` is its OpenAI base
path (``/v1``, or ``/v1beta/openai`` as Google's); ``extra_headers`` go on every answer. With
``native=("messages",)``, Anthropic's ``/v1/messages`` as vLLM serves it, with
``native=("responses",)`` OpenAI's ``/v1/responses``; another route is FastAPI's 404.
Stdlib only: a ThreadingHTTPServer on loopback, HTTP/1.1 keep-alive, streams sent chunked."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, name: str, models: tuple[str, ...] = ("fake-model",), *,
                 latency: float = 0.0, token_delay: float = 0.0, tokens: int = 5,
                 api_key: str | None = None, metrics: bool = True, prefix: str = "/v1",
                 native: tuple[str, ...] = ()) -> None:
        self.name, self.models, self.prefix, self.native = name, list(models), prefix, native
        self.paths: list[str] = []  # the paths of the inference requests received
        self.headers: list[dict] = []  # the headers of every request received
        self.latency, self.token_delay, self.tokens = latency, token_delay, tokens
        self.api_key, self.has_metrics = api_key, metrics
        # "500" | "cut" | "hang" | "429" | "down" | "no-stream-options" (an older server)
        # | "html" (a 404 HTML page, as a proxy in front of it would send)
        self.fault: str | None = None
        self.extra_headers: dict[str, str] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.retry_after = "7"
        self.waiting, self.running = 0, 0
        self.calls: list[dict] = []  # inference bodies received
        self.concurrent = self.max_concurrent = 0
        self.connections = 0  # TCP connections accepted
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake.connections += 1

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                if parsed:
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                return parsed

            def send_response(self, code: int, message: str | None = None) -> None:
                super().send_response(code, message)
                for k, v in fake.extra_headers.items():
                    self.send_header(k, v)

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(("GET", self.path, self.headers.get("Authorization")))
                if not self._authorized():
                    return
                if fake.fault == "down":
                    return self._json(500, {"error": {"message": "down"}})
                if self.path == f"{fake.prefix}/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 1, "owned_by": fake.name}
                        for m in fake.models]})
                if self.path == "/metrics" and fake.has_metrics:
                    text = ("# HELP vllm:num_requests_waiting Waiting.\n"
                            "# TYPE vllm:num_requests_waiting gauge\n"
                            f'vllm:num_requests_waiting{{model_name="m"}} {fake.waiting}\n'
                            "# HELP vllm:num_requests_running Running.\n"
                            "# TYPE vllm:num_requests_running gauge\n"
                            f'vllm:num_requests_running{{model_name="m"}} {fake.running}\n')
                    return self._send(200, text.encode(), "text/plain; version=0.0.4")
                self._json(404, {"error": {"message": "not found", "code": "not_found"}})

            def do_POST(self) -> None:  # noqa: N802
                fake.requests.append(("POST", self.path, self.headers.get("Authorization")))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not self._authorized():
                    return
                known = ("/chat/completions", "/completions", "/embeddings",
                         *(f"/{api}" for api in fake.native))
                route = self.path.split("?")[0]
                if route.startswith(fake.prefix + "/") and \
                        route.removeprefix(fake.prefix) not in known:
                    return self._json(404, {"detail": "Not Found"})
                with fake._lock:
                    fake.calls.append(body)
                    fake.paths.append(self.path)
                    fake.concurrent += 1
                    fake.max_concurrent = max(fake.max_concurrent, fake.concurrent)
                try:
                    self._answer(body)
                finally:
                    with fake._lock:
                        fake.concurrent -= 1

            def _answer(self, body: dict) -> None:
                fault = fake.fault
                if fault in ("500", "down"):
                    return self._json(500, {"error": {"message": "upstream broke",
                                                      "type": "server_error"}})
                if fault == "429":
                    return self._json(429, {"error": {"message": "slow down",
                                                      "type": "rate_limit_error"}},
                                      {"Retry-After": fake.retry_after})
                if fault == "html":
                    return self._send(404, b"<html><body><script>alert(1)</script>Not Found"
                                      b"</body></html>", "text/html")
                if not self.path.startswith(fake.prefix + "/"):
                    return self._json(404, {"error": {"message": "no such route"}})
                if fault == "cut":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "hang":
                    time.sleep(30)
                    return
                if fake.fault == "no-stream-options" and "stream_options" in body:
                    return self._json(400, {"error": {"message": "Unknown field: "
                                                      "stream_options", "param": "stream_options"}})
                if body.get("model") not in fake.models:
                    return self._json(404, {"error": {"message": "no such model",
                                                      "code": "model_not_found"}})
                if self.path.startswith(fake.prefix + "/messages"):
                    return self._message(body)
                if self.path.startswith(fake.prefix + "/responses"):
                    return self._response(body)
                if self.path.endswith("/embeddings"):
                    return self._json(200, {"object": "list", "model": body["model"], "data": [
                        {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                        "usage": {"prompt_tokens": 3, "total_tokens": 3}})
                chat = self.path.endswith("/chat/completions")
                if body.get("stream"):
                    return self._stream(body, chat)
                time.sleep(fake.latency)
                text = f"hello from {fake.name}"
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "stop"} if chat else
                          {"index": 0, "text": text, "finish_reason": "stop"})
                self._json(200, {"id": "x", "object": "chat.completion" if chat else
                                 "text_completion", "created": 1, "model": body["model"],
                                 "choices": [choice], "usage": {
                                     "prompt_tokens": 5, "completion_tokens": fake.tokens,
                                     "total_tokens": 5 + fake.tokens}})

            def _stream(self, body: dict, chat: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                base = {"id": "x", "object": "chat.completion.chunk" if chat else
                        "text_completion", "created": 1, "model": body["model"]}
                for i in range(fake.tokens):
                    time.sleep(fake.token_delay)
                    choice = ({"index": 0, "delta": {"content": f"t{i} "}} if chat else
                              {"index": 0, "text": f"t{i} "})
                    self._chunk({**base, "choices": [choice]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._chunk({**base, "choices": [], "usage": {
                        "prompt_tokens": 5, "completion_tokens": fake.tokens,
                        "total_tokens": 5 + fake.tokens}})
                self._write(b"data: [DONE]\n\n")
                self._write(b"")

            def _message(self, body: dict) -> None:
                text = f"hello from {fake.name}"
                usage = {"input_tokens": 5, "output_tokens": fake.tokens}
                if not body.get("stream"):
                    return self._json(200, {
                        "id": "msg_x", "type": "message", "role": "assistant",
                        "model": body["model"], "content": [{"type": "text", "text": text}],
                        "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = [("message_start", {"type": "message_start", "message": {
                    "id": "msg_x", "type": "message", "role": "assistant",
                    "model": body["model"], "content": [], "stop_reason": None,
                    "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": text}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta", "delta": {
                        "stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": fake.tokens}}),
                    ("message_stop", {"type": "message_stop"})]
                for name, data in events:
                    self._write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self._write(b"")

            def _response(self, body: dict) -> None:
                text = f"hello from {fake.name}"
                message = {"type": "message", "id": "msg_r", "status": "completed",
                           "role": "assistant", "content": [
                               {"type": "output_text", "text": text, "annotations": []}]}
                done = {"id": "resp_native", "object": "response", "created_at": 1,
                        "status": "completed", "model": body["model"], "output": [message],
                        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                        "usage": {"input_tokens": 5, "output_tokens": fake.tokens,
                                  "total_tokens": 5 + fake.tokens}}
                if not body.get("stream"):
                    return self._json(200, done)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                started = {**done, "status": "in_progress", "output": [], "usage": None}
                events = [
                    {"type": "response.created", "response": started},
                    {"type": "response.output_item.added", "output_index": 0,
                     "item": {**message, "status": "in_progress", "content": []}},
                    {"type": "response.content_part.added", "item_id": "msg_r",
                     "output_index": 0, "content_index": 0,
                     "part": {"type": "output_text", "text": "", "annotations": []}},
                    {"type": "response.output_text.delta", "item_id": "msg_r",
                     "output_index": 0, "content_index": 0, "delta": text},
                    {"type": "response.output_text.done", "item_id": "msg_r",
                     "output_index": 0, "content_index": 0, "text": text},
                    {"type": "response.content_part.done", "item_id": "msg_r",
                     "output_index": 0, "content_index": 0,
                     "part": message["content"][0]},
                    {"type": "response.output_item.done", "output_index": 0, "item": message},
                    {"type": "response.completed", "response": done}]
                for i, data in enumerate(events):
                    data["sequence_number"] = i
                    self._write(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode())
                self._write(b"")

            def _chunk(self, payload: dict) -> None:
                self._write(b"data: " + json.dumps(payload, separators=(",", ":")).encode()
                            + b"\n\n")

            def _write(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _authorized(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != \
                        f"Bearer {fake.api_key}":
                    self._json(401, {"error": {"message": "bad key", "code": "invalid_api_key"}})
                    return False
                return True

            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                self._send(status, json.dumps(body).encode(), "application/json", headers)

            def _send(self, status: int, data: bytes, content_type: str,
                      headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 128
        self.url = f"http://127.0.0.1:{self.server.server_port}{prefix}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Stand-ins for the hosted Anthropic and Gemini APIs, as llmlb meets them at their base URLs
(``ANTHROPIC_BASE_URL``, ``GOOGLE_BASE_URL``): their own key headers checked (``x-api-key``,
``x-goog-api-key``), their request shapes checked as the real APIs check them (Anthropic's
``max_tokens`` and alternating turns, Gemini's ``contents`` and the thought signature it wants
back with a call), their answers, streams (Gemini's with CRLF, as it sends them), model lists,
errors and fault modes (429 with Retry-After, 500). A request whose last user text mentions
the weather, or that forces a tool, gets a call of the first tool; a tool's result gets
``it is <result>``. Stdlib only: a ThreadingHTTPServer on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SIGNATURE = "c2lnbmVkIGJ5IGdlbWluaQ=="  # base64, as Gemini's thought signatures are


class _Fake:
    """What both stand-ins share: the server, what they received, faults."""

    name = "fake"

    def __init__(self, key: str, models: tuple[str, ...]) -> None:
        self.key, self.models = key, list(models)
        self.calls: list[tuple[str, dict]] = []  # (path, body) of each POST
        self.headers: list[dict] = []  # every request's headers
        self.post_headers: list[dict] = []  # the headers of each POST (beside ``calls``)
        self.fault: str | None = None  # "429" | "500"
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def do_GET(self) -> None:  # noqa: N802
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                if fake.authorized(self):
                    fake.get(self)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.headers.append(headers)
                with fake.lock:
                    fake.calls.append((self.path, body))
                    fake.post_headers.append(headers)
                if not fake.authorized(self):
                    return
                if fake.fault == "429":
                    return send_json(self, 429, fake.error_body(429, "slow down"),
                                     {"Retry-After": "7"})
                if fake.fault == "500":
                    return send_json(self, 500, fake.error_body(500, "upstream broke"))
                fake.post(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):  # noqa: ANN204
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict:
        raise NotImplementedError

    def get(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def post(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        raise NotImplementedError


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict,
              headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


def start_stream(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def write_chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


class FakeAnthropic(_Fake):
    name = "anthropic"

    def authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        if handler.headers.get("x-api-key") != self.key:
            send_json(handler, 401, self.error_body(401, "invalid x-api-key"))
            return False
        if not handler.headers.get("anthropic-version"):
            send_json(handler, 400, self.error_body(400, "anthropic-version: header is "
                                                    "required"))
            return False
        return True

    def error_body(self, status: int, message: str) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error",
                500: "api_error"}.get(status, "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def get(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.split("?")[0] != "/v1/models":
            return send_json(handler, 404, self.error_body(404, "Not found"))
        send_json(handler, 200, {"data": [{"type": "model", "id": m, "display_name": m,
                                           "created_at": "2025-01-01T00:00:00Z"}
                                          for m in self.models], "has_more": False})

    def post(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        path = handler.path.split("?")[0]
        if body.get("model") not in self.models:
            return send_json(handler, 404, self.error_body(404, f"model: {body.get('model')}"))
        if path == "/v1/messages/count_tokens":
            return send_json(handler, 200, {"input_tokens": 11})
        if path != "/v1/messages":
            return send_json(handler, 404, self.error_body(404, "Not found"))
        problem = _anthropic_problem(body)
        if problem:
            return send_json(handler, 400, self.error_body(400, problem))
        content = self._content(body)
        reason = "tool_use" if content[-1]["type"] == "tool_use" else "end_turn"
        usage = {"input_tokens": 10, "output_tokens": 3}
        message = {"id": "msg_fake01", "type": "message", "role": "assistant",
                   "model": body["model"], "content": content, "stop_reason": reason,
                   "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return send_json(handler, 200, message)
        start_stream(handler)
        events = [("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}), ("ping", {"type": "ping"})]
        for i, block in enumerate(content):
            if block["type"] == "text":
                events.append(("content_block_start", {"type": "content_block_start",
                                                       "index": i, "content_block": {
                                                           "type": "text", "text": ""}}))
                for word in block["text"].split(" "):
                    piece = word if word == block["text"].split(" ")[-1] else word + " "
                    events.append(("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "text_delta", "text": piece}}))
            else:
                events.append(("content_block_start", {"type": "content_block_start",
                                                       "index": i, "content_block": {
                                                           **block, "input": {}}}))
                arguments = json.dumps(block["input"])
                for piece in (arguments[:5], arguments[5:]):
                    events.append(("content_block_delta", {
                        "type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events += [("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": reason, "stop_sequence": None}, "usage": {"output_tokens": 3}}),
            ("message_stop", {"type": "message_stop"})]
        for name, data in events:
            write_chunk(handler, f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        write_chunk(handler, b"")

    def _content(self, body: dict) -> list[dict]:
        last = body["messages"][-1]
        blocks = last["content"] if isinstance(last["content"], list) else [
            {"type": "text", "text": last["content"]}]
        results = [b for b in blocks if b.get("type") == "tool_result"]
        if results:
            content = results[0]["content"]
            text = content if isinstance(content, str) else "".join(
                b.get("text", "") for b in content)
            return [{"type": "text", "text": f"it is {text}"}]
        text = " ".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        forced = (body.get("tool_choice") or {}).get("type") in ("any", "tool")
        if body.get("tools") and (forced or "weather" in text):
            return [{"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_fake01",
                     "name": body["tools"][0]["name"], "input": {"city": "Paris"}}]
        return [{"type": "text", "text": "hello from anthropic"}]


def _anthropic_problem(body: dict) -> str | None:
    """What the real API refuses: no max_tokens, turns that do not alternate, a result
    without its call."""
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    roles = [m.get("role") for m in body.get("messages", ())]
    if not roles or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:], strict=False)):
        return "messages: roles must alternate between user and assistant, starting with user"
    uses = {b.get("id") for m in body["messages"] if isinstance(m.get("content"), list)
            for b in m["content"] if b.get("type") == "tool_use"}
    for m in body["messages"]:
        for b in m["content"] if isinstance(m.get("content"), list) else ():
            if b.get("type") == "tool_result" and b.get("tool_use_id") not in uses:
                return f"unexpected tool_use_id {b.get('tool_use_id')} in tool_result"
    return None


class FakeGemini(_Fake):
    name = "gemini"

    def authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        if handler.headers.get("x-goog-api-key") != self.key or "key=" in handler.path:
            body = self.error_body(400, "API key not valid. Please pass a valid API key.")
            body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                         "reason": "API_KEY_INVALID",
                                         "domain": "googleapis.com"}]
            send_json(handler, 400, body)
            return False
        return True

    def error_body(self, status: int, message: str) -> dict:
        kinds = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL"}
        return {"error": {"code": status, "message": message,
                          "status": kinds.get(status, "UNKNOWN")}}

    def get(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path.split("?")[0] != "/v1beta/models":
            return send_json(handler, 404, self.error_body(404, "Not found"))
        send_json(handler, 200, {"models": [
            {"name": f"models/{m}", "supportedGenerationMethods": ["generateContent",
                                                                   "countTokens"]}
            for m in self.models] + [{"name": "models/text-embedding-fake",
                                      "supportedGenerationMethods": ["embedContent"]}]})

    def post(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        path, _, query = handler.path.partition("?")
        model, _, method = path.removeprefix("/v1beta/models/").partition(":")
        if model not in self.models:
            return send_json(handler, 404, self.error_body(404, f"models/{model} is not found"))
        if method == "countTokens":  # of the request it would answer
            request = body.get("generateContentRequest") or {}
            problem = _gemini_problem(request)
            if problem or request.get("model") != f"models/{model}":
                return send_json(handler, 400, self.error_body(400, problem or "model"))
            return send_json(handler, 200, {"totalTokens": 7})
        problem = _gemini_problem(body)
        if problem:
            return send_json(handler, 400, self.error_body(400, problem))
        parts = self._parts(body)
        called = any("functionCall" in p for p in parts)
        usage = {"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13}
        if method == "generateContent":
            return send_json(handler, 200, {
                "candidates": [{"content": {"role": "model", "parts": parts},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage, "modelVersion": model, "responseId": "gem-fake01"})
        if method != "streamGenerateContent" or query != "alt=sse":
            return send_json(handler, 404, self.error_body(404, f"no method {method}"))
        start_stream(handler)
        pieces = [[p] for p in parts if "functionCall" in p] if called else [
            [{"text": w + " "}] for w in parts[0]["text"].split(" ")[:-1]] + [
            [{"text": parts[0]["text"].split(" ")[-1]}]]
        for i, piece in enumerate(pieces):
            event: dict = {"candidates": [{"content": {"role": "model", "parts": piece},
                                           "index": 0}],
                           "usageMetadata": {"promptTokenCount": 9}, "responseId": "gem-fake01"}
            if i == len(pieces) - 1:
                event["candidates"][0]["finishReason"] = "STOP"
                event["usageMetadata"] = usage
            write_chunk(handler, b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
        write_chunk(handler, b"")

    def _parts(self, body: dict) -> list[dict]:
        last = body["contents"][-1]["parts"]
        results = [p["functionResponse"] for p in last if "functionResponse" in p]
        if results:
            response = results[0]["response"]
            return [{"text": f"it is {response.get('result', json.dumps(response))}"}]
        text = " ".join(p.get("text", "") for p in last)
        mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
        declarations = [d for t in body.get("tools") or () for d in t["functionDeclarations"]]
        if declarations and (mode == "ANY" or "weather" in text):
            return [{"functionCall": {"name": declarations[0]["name"],
                                      "args": {"city": "Paris"}},
                     "thoughtSignature": SIGNATURE}]
        return [{"text": "hello from gemini"}]


def _gemini_problem(body: dict) -> str | None:
    """What the real API refuses: no contents, a role it does not know, a function call of
    an earlier turn sent back without its thought signature."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for content in contents:
        if content.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model (not {content.get('role')})"
        for part in content.get("parts", ()):
            if "functionCall" in part and part.get("thoughtSignature") != SIGNATURE:
                return "Function call is missing a thought_signature in functionCall parts."
    return None

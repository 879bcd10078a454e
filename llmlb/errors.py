"""Every error body llmlb sends: ``{"error": {"message", "type", "code", "param"?}}``, and
under ``/v1/messages`` Anthropic's ``{"type": "error", "error": {"type", "message"}}``.

``APIError`` carries status, type, code, message and optional headers; the constructors below
are the one place where each code's status and wording are decided. ``init_app`` installs
handlers so that any 4xx/5xx under the API prefixes (404, 405 and 413 included) is JSON, in
the shape of the API the request came through.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

API_PREFIXES = ("/v1", "/v0", "/api", "/ws")
# An absolute path in a message (not a URL's path: that follows a host or a ':').
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"()\[\]:,;]+/)+([^\s/'\"()\[\]:,;]*)")


def without_paths(text: str) -> str:
    """``text`` for a client: where llmlb keeps its files is for its operators (the log has
    the whole text), so each absolute path becomes ``…/`` and its last part."""
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(1), text)


class APIError(Exception):
    """An error a client sees as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's shape (AG-2): its error type follows from the status, as Anthropic's
        SDK expects; llmlb's code travels along (extra fields are ignored by the SDKs)."""
        return {"type": "error", "error": {"type": anthropic_type(self.status),
                                           "message": self.message, "code": self.code}}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    error: dict[str, Any] = {"message": message, "type": type, "code": code}
    if param is not None:
        error["param"] = param
    return {"error": error}


ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


# --- the codes -------------------------------------------------------------------------------

def invalid_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def missing_parameter(param: str, hint: str = "") -> APIError:
    """A required field absent; ``hint`` says what belongs there."""
    return invalid_request(f"Missing required parameter: '{param}'{hint}", param,
                           code="missing_required_parameter")


def invalid_json(detail: str) -> APIError:
    return APIError(400, f"Invalid JSON body: {detail}", code="invalid_json")


def invalid_model_id(reason: str, param: str | None = "model") -> APIError:
    return APIError(400, f"Invalid model ID: {reason}", code="invalid_model_id", param=param)


def prompt_too_large(what: str, count: int, limit: int, setting: str, param: str) -> APIError:
    return APIError(400, f"The request has {count} {what}; the limit is {limit} ({setting})",
                    code="prompt_too_large", param=param)


def context_length_exceeded(prompt_tokens: int, context_length: int, at_least: bool = False,
                            param: str = "messages") -> APIError:
    """A prompt longer than the model's context. The wording starts as Anthropic's does
    ("prompt is too long: N tokens > M maximum"): Claude Code compacts its conversation
    when it reads that."""
    more = "at least " if at_least else ""
    return APIError(400, f"prompt is too long: {more}{prompt_tokens} tokens > {context_length} "
                    f"maximum (the context of this model on its node; LLMLB_CONTEXT_LENGTH "
                    f"sets it, up to the model's own limit)", code="context_length_exceeded",
                    param=param)


def unsupported_field(param: str, why: str) -> APIError:
    """A field of an agent API that would change the answer and that llmlb cannot honour."""
    return APIError(400, f"'{param}' cannot be honoured: {why}", code="unsupported_parameter",
                    param=param)


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    """A stored response that does not exist, has expired, or belongs to another key."""
    what = "Previous response" if param == "previous_response_id" else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param,
                    code="previous_response_not_found" if param else "response_not_found")


def alias_not_found(name: str) -> APIError:
    return APIError(404, f"No alias named '{name}'", code="alias_not_found")


def model_not_found(model_id: str, *, in_catalog_hint: bool = True) -> APIError:
    if in_catalog_hint:
        message = f"Model '{model_id}' is not supported. Check supported_models.json."
    else:
        message = f"Model '{model_id}' not found"
    return APIError(404, message, code="model_not_found", param="model")


def provider_not_configured(model: str, provider: str, variable: str) -> APIError:
    """A hosted provider's model (``openai:gpt-4o``) on a balancer without that provider's key."""
    return APIError(404, f"Model '{model}' is {provider}'s, and this llmlb has no {provider} "
                    f"API key: set {variable} in the balancer's environment",
                    code="provider_not_configured", param="model")


def provider_cannot(provider: str, path: str) -> APIError:
    """An API a hosted provider has no equivalent of (Anthropic's embeddings)."""
    return APIError(400, f"{provider} has no equivalent of {path}; use another model",
                    code="unsupported_operation", param="model")


def model_not_allowed(model_id: str, host: str) -> APIError:
    """A catalog model whose only source this node may not download from."""
    return APIError(404, f"Model '{model_id}' is in supported_models.json, but its source "
                    f"{host} is not in LLMLB_DOWNLOAD_ALLOWLIST and no balancer has it",
                    code="model_not_found", param="model")


def file_not_found(model_id: str, name: str) -> APIError:
    return APIError(404, f"Model '{model_id}' has no file '{name}'", code="file_not_found")


def download_in_progress(model_id: str) -> APIError:
    return APIError(409, f"Model '{model_id}' is downloading; delete it when the download has "
                    "ended", code="download_in_progress")


def shared_model(model_id: str) -> APIError:
    return APIError(400, f"Model '{model_id}' lives on the shared path "
                    "(LLMLB_SHARED_MODELS_DIR); llmlb never deletes shared copies",
                    code="shared_model")


def model_not_supported(model_id: str) -> APIError:
    return APIError(400, f"Model '{model_id}' is not in supported models list",
                    code="model_not_supported", param="model_id")


def insufficient_memory(required_bytes: int, available_bytes: int, weights_bytes: int = 0,
                        kv_cache_bytes: int = 0, sequences: int = 0,
                        context: int = 0) -> APIError:
    """``kv_cache_bytes``: the part of the requirement that is the KV cache of ``sequences``
    sequences of ``context`` tokens (0: the weights alone)."""
    detail = ""
    if kv_cache_bytes:
        detail = (f" (the model {weights_bytes // 2**20} MiB, its KV cache "
                  f"{kv_cache_bytes // 2**20} MiB for {sequences} "
                  f"sequence{'s' * (sequences != 1)} of {context} tokens)")
    return APIError(
        400,
        f"Insufficient VRAM. Required: {_gb(required_bytes)}, Available: "
        f"{_gb(available_bytes)}{detail}", type="resource_error", code="insufficient_memory")


def model_downloading(model_id: str, progress: float, retry_after: int = 10) -> APIError:
    return APIError(
        503, f"Model '{model_id}' is still downloading ({int(progress * 100)}% complete)",
        type="service_unavailable", code="model_downloading",
        headers={"Retry-After": str(retry_after)})


def download_failed(cause: str) -> APIError:
    return APIError(502, f"Failed to download model: {without_paths(cause)}", type="upstream_error",
                    code="download_failed")


def model_busy(model_id: str, retry_after: int = 2) -> APIError:
    return APIError(503, f"Model '{model_id}' is busy: too many requests are waiting for it. "
                    "Retry shortly.", type="service_unavailable", code="model_busy",
                    headers={"Retry-After": str(retry_after)})


def engine_unavailable(model_id: str, fmt: str, reason: str) -> APIError:
    return APIError(503, f"Model '{model_id}' needs the {fmt} engine, which is unavailable "
                    f"on this node: {without_paths(reason)}", type="service_unavailable",
                    code="engine_unavailable")


def no_node_available(model_id: str, retry_after: int, detail: str | None = None) -> APIError:
    why = f": {detail}" if detail else ": every node that has it is offline or cooling down"
    return APIError(503, f"No node can serve model '{model_id}' right now{why}",
                    type="service_unavailable", code="no_node_available",
                    headers={"Retry-After": str(max(1, retry_after))})


def endpoints_full(model_id: str, limit: int, retry_after: int = 1) -> APIError:
    return APIError(429, f"Every endpoint that serves model '{model_id}' already holds "
                    f"{limit} requests (LLMLB_ENDPOINT_MAX_REQUESTS). Retry shortly.",
                    type="rate_limit_error", code="endpoint_queue_full",
                    headers={"Retry-After": str(retry_after)})


def node_failed(node: str, cause: str) -> APIError:
    """A node that broke off a response already under way (sent as a stream's last event)."""
    return APIError(502, f"Node '{node}' failed during the response: {cause}",
                    type="upstream_error", code="node_failed")


def unreadable_upstream_answer(what: str) -> APIError:
    """An endpoint's answer the balancer had to translate and could not read."""
    return APIError(502, f"The endpoint's {what} could not be read", type="upstream_error",
                    code="bad_upstream_answer")


def client_closed() -> APIError:
    """The client left before its answer was ready: the work stopped, nobody reads this
    (it is what the request history and the metrics record; nginx's 499)."""
    return APIError(499, "The client closed the connection before the answer was ready",
                    code="client_closed_request")


def upstream_not_json(kind: str, name: str, status: int, media_type: str) -> APIError:
    """A node's or endpoint's answer that is neither JSON nor an event stream (a proxy's HTML
    error page): never passed on as it is, from llmlb's origin."""
    what = media_type or "no Content-Type"
    return APIError(502, f"The {kind} '{name}' answered HTTP {status} with {what}, not an "
                    f"OpenAI JSON answer (is its URL right?)", type="upstream_error",
                    code="upstream_error")


def endpoint_is_this_llmlb(base_url: str) -> APIError:
    return APIError(400, f"The endpoint at {base_url} is this llmlb itself: its requests "
                    "would come back here forever. Add another server (or another llmlb).",
                    code="endpoint_loop", param="base_url")


def relayed(status: int, body: dict) -> APIError:
    """A node's error, passed on as the node gave it (a node's 404 stays a 404)."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return APIError(status, str(error.get("message") or f"The node answered HTTP {status}"),
                    type=str(error.get("type") or ("server_error" if status >= 500
                                                   else "invalid_request_error")),
                    code=error.get("code"), param=error.get("param"))


def key_not_found(key_id: int) -> APIError:
    return APIError(404, f"No active API key with id {key_id}", code="key_not_found")


def node_not_found(name: str) -> APIError:
    return APIError(404, f"No node named '{name}' is registered", code="node_not_found")


def endpoint_not_found(name: str) -> APIError:
    return APIError(404, f"No endpoint named '{name}'", code="endpoint_not_found")


def name_taken(name: str, why: str) -> APIError:
    """A node or endpoint name already in use; ``why`` says by what and what to do."""
    return APIError(409, f"The name '{name}' {why}", code="name_taken", param="name")


def model_load_failed(model_id: str, cause: str) -> APIError:
    return APIError(500, f"Model '{model_id}' could not be loaded: {without_paths(cause)}",
                    type="server_error", code="model_load_failed")


def invalid_prompt(cause: str, param: str = "messages") -> APIError:
    """An engine refused the prompt (too long for the model, a template that cannot render
    it, a schema it cannot follow)."""
    return APIError(400, f"Invalid prompt: {without_paths(cause)}", code="invalid_prompt",
                    param=param)


def engine_failed(cause: str) -> APIError:
    return APIError(500, f"The engine failed: {without_paths(cause)}", type="server_error",
                    code="engine_error")


def unsupported_operation(model_id: str, operation: str) -> APIError:
    return APIError(400, f"Model '{model_id}' does not support {operation}",
                    code="unsupported_operation", param="model")


def unsupported_parameter(param: str, engine: str, model_id: str) -> APIError:
    return APIError(400, f"The parameter '{param}' is not supported by the {engine} engine "
                    f"that runs model '{model_id}'; GET /v0/engines lists what each engine "
                    "supports", code="unsupported_parameter", param=param)


def unauthorized(message: str = "Missing API key. Send 'Authorization: Bearer <key>' or "
                 "'X-API-Key: <key>'.") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def session_ended() -> APIError:
    """A dashboard call without a valid session any more (logged out, a new password, the
    login's lifetime over): the dashboard sends its user back to the login page."""
    return APIError(401, "Your dashboard session has ended (logged out, password changed or "
                    "expired): log in again", type="authentication_error",
                    code="session_ended")


def forbidden(scope: str) -> APIError:
    return APIError(403, f"This API key lacks the scope required here ({scope})",
                    type="permission_error", code="insufficient_scope")


def csrf_failed() -> APIError:
    return APIError(403, "Missing or wrong CSRF token; reload the page",
                    type="permission_error", code="csrf_failed")


def origin_not_allowed(origin: str | None) -> APIError:
    return APIError(403, f"WebSocket from origin {origin or '(none)'} refused: a dashboard "
                    "session may open it only from the dashboard's own page",
                    type="permission_error", code="origin_not_allowed")


def too_many_websockets(limit: int, retry_after: int = 5) -> APIError:
    return APIError(503, f"Too many WebSockets are open ({limit} per worker, "
                    "LLMLB_MAX_WEBSOCKETS); retry later", type="service_unavailable",
                    code="too_many_websockets", headers={"Retry-After": str(retry_after)})


class StateUnavailable(Exception):
    """Raised by the state (``llmlb/state/``): the shared state cannot be read or written
    right now (the database down, restarting, every connection busy). The message is for the
    log; a client sees ``state_unavailable``."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def state_unavailable(retry_after: int = 1) -> APIError:
    """The shared state (the database) cannot be reached: nothing was done, try again."""
    return APIError(503, "The database is unavailable right now (restarting, or unreachable); "
                    "nothing was done. Try again shortly.", type="service_unavailable",
                    code="state_unavailable", headers={"Retry-After": str(retry_after)})


def rate_limit_exceeded(key_name: str, what: str, name: str, limit: int, wait: float,
                        headers: list[tuple[str, str]]) -> APIError:
    """A key past one of its limits (``limits.py``): which one, and when to come back."""
    retry = max(1, math.ceil(wait))
    return APIError(429, f"Rate limit reached for key '{key_name}' on {what} ({name}): "
                    f"limit {limit}. Try again in {retry} s.",
                    type="tokens" if "tokens" in what else "requests",
                    code="rate_limit_exceeded", param=name,
                    headers={**dict(headers), "Retry-After": str(retry)})


def model_not_permitted(model_id: str, key_name: str, allowed: tuple[str, ...]) -> APIError:
    """A model outside the key's list of models (``limits.py``)."""
    return APIError(403, f"Key '{key_name}' may not use model '{model_id}'; it may use: "
                    f"{', '.join(allowed)}", type="permission_error",
                    code="model_not_allowed", param="model")


def login_throttled(retry_after: int) -> APIError:
    return APIError(429, f"Too many failed logins. Try again in {retry_after} seconds.",
                    type="rate_limit_error", code="login_throttled",
                    headers={"Retry-After": str(retry_after)})


def not_found(path: str) -> APIError:
    return APIError(404, f"Unknown URL: {path}", code="not_found")


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"Method {method} is not allowed for {path}", code="method_not_allowed")


def request_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {limit} bytes",
                    code="request_too_large")


def unparsable_request(status: int, reason: str, detail: str, line_limit: int) -> APIError:
    """A request the HTTP server refused before llmlb saw it, with the status it chose: a
    URL over the request-line limit (414), headers too large (431), a malformed request."""
    if status == 414:
        return APIError(414, f"The URL is too long (the request line may have at most "
                        f"{line_limit} bytes); send long data in a POST body",
                        code="uri_too_long")
    if status >= 500:
        return internal_error()
    return APIError(status, f"Malformed HTTP request: {detail}",
                    code=reason.lower().replace(" ", "_") or "bad_request")


def internal_error() -> APIError:
    return APIError(500, "Internal server error; the details are in the server log",
                    type="server_error", code="internal_error")


def from_exception(exc: BaseException) -> APIError:
    """The APIError for any exception raised while serving (the node has turned engines'
    errors into theirs, ``invalid_prompt`` and ``engine_failed``; the state's absence is
    ``state_unavailable``)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, StateUnavailable):
        return state_unavailable(exc.retry_after)
    return internal_error()


def _gb(n: int) -> str:
    gb = n / 1024**3
    return f"{gb:.0f}GB" if gb >= 10 or gb == int(gb) else f"{gb:.1f}GB"


# --- Flask wiring -----------------------------------------------------------------------------

def is_api_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in API_PREFIXES)


def init_app(app) -> None:  # noqa: ANN001 - Flask app, imported lazily to keep this module pure
    from flask import jsonify, request
    from werkzeug.exceptions import HTTPException

    def respond(err: APIError):
        response = jsonify(err.anthropic_body() if is_anthropic_path(request.path)
                           else err.body())
        response.status_code = err.status
        for key, value in err.headers.items():
            response.headers[key] = value
        return response

    @app.errorhandler(APIError)
    def handle_api_error(err: APIError):
        return respond(err)

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException):
        if not is_api_path(request.path):
            return exc
        if exc.code == 404:
            err = not_found(request.path)
        elif exc.code == 405:
            err = method_not_allowed(request.method, request.path)
            allowed = exc.get_response().headers.get("Allow")
            if allowed:
                err.headers["Allow"] = allowed
        elif exc.code == 413:
            err = request_too_large(app.config.get("MAX_CONTENT_LENGTH") or 0)
        else:
            err = APIError(exc.code or 500, exc.description or exc.name,
                           type="invalid_request_error" if (exc.code or 500) < 500
                           else "server_error", code=(exc.name or "error").lower().replace(" ", "_"))
        return respond(err)

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        err = from_exception(exc)
        if err.code == "internal_error":
            log.exception("Unhandled error on %s %s", request.method, request.path)
        if not is_api_path(request.path):
            if err.code == "state_unavailable":  # a dashboard page: the same advice, as text
                return err.message, err.status, err.headers
            return "Internal server error", 500
        return respond(err)

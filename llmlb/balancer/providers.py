"""Hosted providers by prefix (AG-4): ``openai:<model>``, ``anthropic:<model>`` and
``google:<model>`` go to OpenAI, Anthropic or Google's Gemini API with the key from the
balancer's environment (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ``GOOGLE_API_KEY``), at
their base URLs (``OPENAI_BASE_URL``…), from any of llmlb's APIs.

A configured provider is a member of the balancer like a node or an endpoint: a registry row
of kind ``provider`` (its cooldowns, failures and model list shared by every worker, its
requests counted in metrics and history under its name), routed to with the same failover and
cooldown. What the row never holds is where the key goes: the URL and key come from this
process's settings only, so the key reaches its provider's base URL and nothing else.

Each provider serves some of llmlb's operations in its own API (``NATIVE``), which get the
client's request with the model's prefix taken off; the rest are translated by the dialect
modules: a chat completion to Anthropic's Messages (``dialects/messages_upstream.py``) or
Gemini's ``generateContent`` (``dialects/gemini.py``) and back, and the Responses and Messages
APIs to chat completions first (``translate.translated``), so that every API reaches every
provider. A model list is asked of each every ``LLMLB_PROVIDER_CHECK_SECONDS`` for
``/v1/models``; a model missing from it is sent on all the same.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from .. import errors, urls
from ..config import ProviderSettings, SettingsError
from ..dialects import COUNT_TOKENS, MESSAGES, RESPONSES, gemini, messages, messages_upstream
from ..disconnect import ClientLeft
from ..wire import DONE, data_of, dumps, event, loads
from . import http1
from .registry import PROVIDER, NodeRegistry
from .reports import EndpointReport, ModelEntry
from .translate import translated, translated_error
from .upstream import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    JSON_HEADERS,
    SSE_HEADERS,
    NodeResponse,
    NodeUnreachable,
    ProxyRequest,
    error_response,
    is_json,
    json_response,
    media_type_of,
    passed_headers,
)

log = logging.getLogger(__name__)

OPENAI, ANTHROPIC, GOOGLE = "openai", "anthropic", "google"
ANTHROPIC_VERSION = "2023-06-01"
#: the client headers an Anthropic request takes along (Claude Code's betas need theirs)
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
MAX_LIST_BYTES = 8 * 1024 * 1024
MAX_MODELS = 5000  # of one provider's list (reports hold at most 10,000 items)
MAX_ERROR = 500


@dataclass(frozen=True)
class Spec:
    """What llmlb knows of one hosted provider."""

    name: str
    key_setting: str  # the ProviderSettings attribute; its variable is what users set
    key_variable: str
    url_setting: str
    url_variable: str
    native: frozenset[str]  # the operations it serves in its own API
    list_path: str  # its model list


SPECS = {spec.name: spec for spec in (
    Spec(OPENAI, "openai_api_key", "OPENAI_API_KEY", "openai_base_url", "OPENAI_BASE_URL",
         frozenset((CHAT, COMPLETION, EMBEDDINGS, RESPONSES)), "/v1/models"),
    Spec(ANTHROPIC, "anthropic_api_key", "ANTHROPIC_API_KEY", "anthropic_base_url",
         "ANTHROPIC_BASE_URL", frozenset((MESSAGES, COUNT_TOKENS)), "/v1/models?limit=1000"),
    Spec(GOOGLE, "google_api_key", "GOOGLE_API_KEY", "google_base_url", "GOOGLE_BASE_URL",
         frozenset(), "/v1beta/models?pageSize=1000"),
)}


def provider_of(model: str) -> tuple[Spec, str] | None:
    """The provider a model name names by its prefix, and its own name for the model."""
    prefix, colon, name = model.partition(":")
    spec = SPECS.get(prefix.lower()) if colon else None
    if spec is None or not name or not name.isprintable() or not name.isascii() \
            or any(ch.isspace() for ch in name):
        return None
    return spec, name


class ProviderNode:
    """One hosted provider behind the node seam: ``send`` answers as a node would, in the
    API the request came in."""

    def __init__(self, spec: Spec, base_url: str, key: str, *, pool_size: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self.spec, self.name, self.url = spec, spec.name, base_url
        self.pool = http1.Pool(base_url, maxsize=pool_size, connect_timeout=connect_timeout,
                               read_timeout=read_timeout)
        self.headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if spec.name == ANTHROPIC:
            self.headers.update({"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION})
        elif spec.name == GOOGLE:
            self.headers["x-goog-api-key"] = key
        else:
            self.headers["Authorization"] = f"Bearer {key}"

    def path(self, api_path: str) -> str:
        """Where the provider answers ``api_path`` (``/v1/...``, ``/v1beta/...``): under an
        OpenAI base URL as the ``openai`` SDK takes it (``…/v1``), under Anthropic's and
        Google's as their SDKs do (the host, a ``/v1`` or ``/v1beta`` on it allowed)."""
        if self.name == OPENAI:
            return urls.endpoint_path(self.url, api_path)
        base = urlsplit(self.url).path.rstrip("/")
        return base.removesuffix("/v1beta" if self.name == GOOGLE else "/v1") + api_path

    def close(self) -> None:
        self.pool.close()

    def send(self, request: ProxyRequest) -> NodeResponse:
        try:
            return self._send(request)
        except ClientLeft:
            return error_response(errors.client_closed(), request.operation)

    def _send(self, request: ProxyRequest) -> NodeResponse:
        operation = request.operation
        if operation in self.spec.native:
            return self._native(request)
        if operation == COUNT_TOKENS and self.name == GOOGLE:
            return self._count_gemini_tokens(request)
        if operation in (RESPONSES, MESSAGES, COUNT_TOKENS):
            return translated(self, request)  # to chat completions, which come back here
        if operation != CHAT:
            return error_response(errors.provider_cannot(self.name, request.path), operation)
        model = self._model(request)
        try:
            if self.name == ANTHROPIC:
                body, call = messages_upstream.to_messages(request.payload, model)
                path = "/v1/messages"
            else:
                body, call = gemini.to_gemini(request.payload, model)
                path = f"/v1beta/models/{quote(model, safe='')}:" + (
                    "streamGenerateContent?alt=sse" if call.stream else "generateContent")
        except errors.APIError as exc:
            return error_response(exc)
        response = self._post(path, body, request)
        if response.status >= 300:
            return self._error(response)
        if call.stream:
            chunks = (messages_upstream.chat_chunks(self._events(response), call)  # type: ignore[arg-type]
                      if self.name == ANTHROPIC else gemini.chat_chunks(self._events(response), call))  # type: ignore[arg-type]
            return NodeResponse(200, list(SSE_HEADERS), _chat_stream(chunks), response.close)
        try:
            answer = json.loads(self._read(response))
            chat = (messages_upstream.chat_answer(answer, call) if self.name == ANTHROPIC  # type: ignore[arg-type]
                    else gemini.chat_answer(answer, call))  # type: ignore[arg-type]
        except errors.APIError as exc:
            return error_response(exc)
        except (ValueError, TypeError, AttributeError):
            return error_response(errors.unreadable_upstream_answer(f"{self.name} answer"))
        return json_response(200, chat)

    def _count_gemini_tokens(self, request: ProxyRequest) -> NodeResponse:
        """``count_tokens`` as Gemini's ``countTokens`` (free, where a one-token generation,
        what other chat-only upstreams get, is not)."""
        model = self._model(request)
        try:
            chat_body, _ = messages.to_chat(request.payload, count_only=True)
            body, _ = gemini.to_gemini(chat_body, model)
        except errors.APIError as exc:
            return error_response(exc, COUNT_TOKENS)
        response = self._post(f"/v1beta/models/{quote(model, safe='')}:countTokens",
                              gemini.count_request(body, model), request)
        if response.status >= 300:
            return translated_error(self._error(response), COUNT_TOKENS)
        try:
            tokens = int(loads(self._read(response))["totalTokens"])  # type: ignore[index]
        except (ValueError, KeyError, TypeError):
            return error_response(errors.unreadable_upstream_answer("google token count"),
                                  COUNT_TOKENS)
        return json_response(200, {"input_tokens": tokens})

    # --- the provider's own API -----------------------------------------------------------

    def _model(self, request: ProxyRequest) -> str:
        found = provider_of(str(request.payload.get("model", "")))
        return found[1] if found is not None else str(request.payload.get("model", ""))

    def _native(self, request: ProxyRequest) -> NodeResponse:
        """The request as the client sent it, to the provider's own route; ``model`` without
        the prefix, and without ``previous_response_id``: the balancer has put that
        response's turns into the input already."""
        payload = {**request.payload, "model": self._model(request)}
        payload.pop("previous_response_id", None)
        response = self._post(request.path, payload, request)
        headers = passed_headers(response.headers)
        media_type = media_type_of(response.header("Content-Type"))
        if media_type != "text/event-stream" or response.status >= 300:
            data = self._read(response)
            if not is_json(media_type, data):  # a proxy's HTML page: never passed on
                return error_response(errors.upstream_not_json(
                    "provider", self.name, response.status, media_type), request.operation)
            return NodeResponse(response.status, headers, data)
        return NodeResponse(response.status, headers, self._chunks(response), response.close)

    def _post(self, path: str, payload: dict, request: ProxyRequest) -> http1.Response:
        headers = self.headers
        if self.name == ANTHROPIC and request.headers:
            headers = {**headers, **{k: v for k, v in request.headers
                                     if k.lower() in ANTHROPIC_HEADERS}}
        # A whole answer comes only when it is done: a client that leaves meanwhile stops it.
        client = None if payload.get("stream") else request.client
        try:
            return self.pool.request("POST", self.path(path), dumps(payload), headers,
                                     client.sock if client is not None else None)
        except http1.ClientGone:
            raise ClientLeft() from None
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"provider {self.name}: {exc}") from exc

    def _read(self, response: http1.Response) -> bytes:
        try:
            return response.read()
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"provider {self.name}: {exc}") from exc

    def _chunks(self, response: http1.Response) -> Iterator[bytes]:
        try:
            yield from response.chunks()
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"provider {self.name}: {exc}") from exc

    def _events(self, response: http1.Response) -> Iterator[dict]:
        for data in data_of(self._chunks(response)):
            if data.strip() == b"[DONE]":
                return
            event_data = json.loads(data)
            if isinstance(event_data, dict):
                yield event_data

    def _error(self, response: http1.Response) -> NodeResponse:
        """The provider's error as a chat completion's (its status and Retry-After kept)."""
        data = self._read(response)
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        status = gemini.error_status(response.status, body) if self.name == GOOGLE \
            else response.status
        err = errors.relayed(status, body if isinstance(body, dict) else {})
        kept = [(k, v) for k, v in response.headers if k.lower() == "retry-after"]
        return NodeResponse(err.status, JSON_HEADERS + kept,
                            json.dumps(err.body(), separators=(",", ":")).encode())

    # --- its models -----------------------------------------------------------------------

    def models(self) -> list[str]:
        """Its model names (one page of its list). Raises NodeUnreachable or ValueError."""
        headers = {k: v for k, v in self.headers.items() if k != "Content-Type"}
        try:
            response = self.pool.request("GET", self.path(self.spec.list_path), None, headers)
            data = b""
            for chunk in response.chunks():
                data += chunk
                if len(data) > MAX_LIST_BYTES:
                    response.close()
                    raise ValueError(f"the model list is larger than {MAX_LIST_BYTES} bytes")
        except http1.HTTPClientError as exc:
            raise NodeUnreachable(f"provider {self.name}: {exc}") from exc
        if response.status != 200:
            raise ValueError(f"its model list answered HTTP {response.status}")
        listing = json.loads(data)
        if not isinstance(listing, dict):
            raise ValueError("its model list is not a JSON object")
        return (gemini.listed_models(listing) if self.name == GOOGLE
                else messages_upstream.listed_models(listing))


def _chat_stream(chunks: Iterator[dict]) -> Iterator[bytes]:
    """Chat completion chunks as server-sent events; an error the provider sent mid-stream as
    the error event, and ``[DONE]``. A connection that breaks (NodeUnreachable) is left to the
    balancer, which ends the stream and cools the provider down."""
    try:
        for chunk in chunks:
            yield event(chunk).encode()
    except errors.APIError as exc:
        yield event(exc.body()).encode()
    except (ValueError, TypeError, AttributeError):
        yield event(errors.unreadable_upstream_answer("stream").body()).encode()
    yield DONE.encode()


def configured(settings: ProviderSettings) -> dict[str, str]:
    """The providers there is a key for: name -> base URL. Raises SettingsError for a base URL
    a key may not be sent to."""
    found = {}
    for spec in SPECS.values():
        if getattr(settings, spec.key_setting):
            try:
                found[spec.name] = urls.check_url(getattr(settings, spec.url_setting))
            except urls.BadURL as exc:
                raise SettingsError(f"{spec.url_variable} {exc}") from None
    return found


class Providers:
    """The providers this process has a key for, each with the node that reaches it."""

    def __init__(self, settings: ProviderSettings, *, pool_size: int, connect_timeout: float,
                 read_timeout: float) -> None:
        self.nodes: dict[str, ProviderNode] = {
            name: ProviderNode(SPECS[name], url, getattr(settings, SPECS[name].key_setting),
                               pool_size=pool_size, connect_timeout=connect_timeout,
                               read_timeout=read_timeout)
            for name, url in configured(settings).items()}

    def node(self, name: str) -> ProviderNode | None:
        return self.nodes.get(name)

    def check(self, model: str) -> bool:
        """Whether a model name is a configured provider's; a 404 naming the variable to set
        when it is a provider's that has no key here."""
        found = provider_of(model)
        if found is None:
            return False
        if found[0].name not in self.nodes:
            raise errors.provider_not_configured(model, found[0].name, found[0].key_variable)
        return True

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


class ProviderWatch:
    """The supervisor's ``provider-check`` task: keeps the provider rows in step with the keys
    this balancer has, and each provider's model list (a failed list keeps the last one)."""

    def __init__(self, providers: Providers, registry: NodeRegistry,
                 now: Callable[[], float] = time.time) -> None:
        self.providers, self.registry, self.now = providers, registry, now

    def __call__(self) -> None:
        self.registry.sync_providers({n: p.url for n, p in self.providers.nodes.items()})
        rows = {r.name: r for r in self.registry.nodes(fresh=True) if r.kind == PROVIDER}
        for name, node in self.providers.nodes.items():
            record = rows.get(name)
            if record is None:
                continue
            last = record.report
            try:
                names = node.models()
            except (NodeUnreachable, ValueError) as exc:
                if not isinstance(last, EndpointReport) or last.error is None:
                    log.warning("Provider %s: its model list could not be read: %s", name, exc)
                self.registry.checked(record.id, EndpointReport(
                    healthy=False, models=last.models, checked_at=self.now(),
                    error=str(exc)[:MAX_ERROR]))
                continue
            self.registry.checked(record.id, EndpointReport(
                healthy=True, models=tuple(ModelEntry(f"{name}:{model}", owned_by=name)
                                           for model in names[:MAX_MODELS]),
                checked_at=self.now()))

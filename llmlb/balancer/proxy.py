"""Forwarding one inference request (LB-2, LB-3): choose the nodes to try, hand the request to
the first, fail over before the first byte, pass the answer through as it arrives.

Before anything reaches the client, a node that cannot be reached, times out or answers 5xx
goes into cooldown and the request goes to the next candidate (a 503's Retry-After sets the
cooldown). When none is left, the last node error is relayed as it was (its status and code),
or, when no node answered at all, the client gets 503 ``no_node_available`` with Retry-After.
Once a stream has started, a node that fails ends it with a ``data: {"error": …}`` event and
``data: [DONE]``. The client leaving closes the node's connection, which stops its work.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import errors
from ..aliases import Aliases
from ..catalog import Catalog
from ..config import ClusterSettings
from ..dialects import stream_ended, stream_error
from ..disconnect import ClientWatch
from ..history import RequestRecord
from ..limiter import Limiter
from ..limits import Quota
from ..storage import requested_model_id
from ..wire import parse_json_object
from . import placement, routing
from .accounting import Watch, with_usage
from .members import Cluster, Member, RemoteMember
from .prefixes import PrefixRecord
from .providers import provider_of
from .registry import COOLDOWN, ENDPOINT, OFFLINE, ONLINE, PROVIDER, NodeRegistry
from .translate import Translator
from .upstream import NodeResponse, NodeUnreachable, ProxyRequest

log = logging.getLogger(__name__)


@dataclass
class Forwarded:
    """A node's answer to the client; ``node`` is who answered (``X-LLMLB-Node``)."""

    node: str | None
    response: NodeResponse


def requested_model(payload: dict) -> str:
    """The request's ``model``, checked: a 400 naming the field when missing or invalid."""
    model = payload.get("model")
    if model is None:
        raise errors.missing_parameter("model")
    if not isinstance(model, str):
        raise errors.invalid_request("Invalid value for 'model': Input should be a valid "
                                     "string", "model")
    return requested_model_id(model)


def retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from an API server; the usual cooldown applies


def _refused_usage(response: NodeResponse) -> bool:
    return response.status == 400 and isinstance(response.body, bytes) \
        and b"stream_options" in response.body


class _Once:
    def __init__(self, *actions) -> None:  # noqa: ANN002 - callables
        self._actions = actions

    def __call__(self) -> None:
        actions, self._actions = self._actions, ()
        for action in actions:
            action()


class Balancer:
    """``has_files(request)``: whether this host holds the request's model files (a node
    may then fetch them from here); ``aliases``: the names that stand for lists of models."""

    def __init__(self, settings: ClusterSettings, cluster: Cluster, catalog: Catalog,
                 has_files: Callable[[ProxyRequest], bool], registry: NodeRegistry | None,
                 on_done: Callable[[RequestRecord], None] | None = None,
                 aliases: Aliases | None = None, limiter: Limiter | None = None) -> None:
        self.settings, self.cluster, self.catalog = settings, cluster, catalog
        self.has_files, self.registry = has_files, registry
        self.on_done, self.aliases, self.limiter = on_done, aliases, limiter
        self.translator = Translator()  # the agent APIs for endpoints that lack them
        # Where recent prompt prefixes were served, beside the in-flight counters.
        self.prefixes = PrefixRecord(cluster.inflight.path.with_suffix(".prefixes"))

    def forward(self, operation: str, raw: bytes, caller: str | None = None,
                payload: dict | None = None,
                headers: tuple[tuple[str, str], ...] = (),
                client: ClientWatch | None = None, *, quota: Quota | None) -> Forwarded:
        """Hand the request to a node and return its answer; ``caller`` (the key's name) is
        what the request history says sent it; ``payload``, the body already parsed;
        ``headers``, the client's that a hosted provider reads (``anthropic-beta``);
        ``client`` watches the client's connection (an answer not yet begun stops when it
        closes); ``quota``: the key's limits, checked once the model is known (403, 429),
        given back when the answer ends (required: a route that forgot it would let every
        limit through)."""
        if self.on_done is None and quota is None:
            return self._forward(operation, raw, None, payload, headers, client)
        watch = Watch(operation, caller, self.on_done or (lambda _record: None))
        try:
            forwarded = self._forward(operation, raw, watch, payload, headers, client, quota)
        except errors.APIError as exc:
            if watch.ticket is not None and watch.ticket.headers:
                exc.headers = {**dict(watch.ticket.headers), **exc.headers}
            watch.failed(exc.status, exc.code)
            raise
        except Exception as exc:  # recorded, and whatever the key's ticket holds given back
            error = errors.from_exception(exc)
            watch.failed(error.status, error.code)
            raise
        response = watch.answered(forwarded.node, forwarded.response)
        if watch.ticket is not None and watch.ticket.headers:
            response = NodeResponse(response.status, [*response.headers, *watch.ticket.headers],
                                    response.body, response.close)
        return Forwarded(forwarded.node, response)

    def _forward(self, operation: str, raw: bytes, watch: Watch | None,
                 payload: dict | None, headers: tuple[tuple[str, str], ...],
                 client: ClientWatch | None = None, quota: Quota | None = None) -> Forwarded:
        if payload is None:
            payload = parse_json_object(raw)
        model_id, refusal = self.requested_model(payload)
        if watch is not None:
            watch.model = model_id
            if quota is not None and self.limiter is not None:
                # the name the client asked for (an alias is allowed or not as itself)
                watch.ticket = self.limiter.admit(quota, model_id)
        targets = self.aliases.resolve(model_id) if self.aliases is not None else None
        if targets:
            return self._forward_alias(operation, payload, targets, watch, headers, client)
        request = ProxyRequest(operation, raw, payload, model_id, id_refusal=refusal,
                               headers=headers, client=client)
        if watch is not None:
            request, watch.strip_usage = with_usage(request)
        prefix = routing.LazyPrefix(request.operation, model_id, payload) \
            if self.settings.affinity else None
        return self._attempt(self.candidates(request, prefix), request, prefix)

    def _forward_alias(self, operation: str, payload: dict, targets: list[str],
                       watch: Watch | None, headers: tuple[tuple[str, str], ...],
                       client: ClientWatch | None) -> Forwarded:
        """An alias (AG-5): its models in order, the next one when a model cannot be served
        or its nodes fail before the first byte."""
        failure: errors.APIError | Forwarded | None = None
        for i, target in enumerate(targets):
            body = {**payload, "model": target}
            try:
                model_id, refusal = self.requested_model(body)
                raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
                request = ProxyRequest(operation, raw, body, model_id, id_refusal=refusal,
                                       headers=headers, client=client)
                if watch is not None:
                    watch.model = model_id
                    request, watch.strip_usage = with_usage(request)
                prefix = routing.LazyPrefix(operation, model_id, body) \
                    if self.settings.affinity else None
                forwarded = self._attempt(self.candidates(request, prefix), request, prefix)
            except errors.APIError as exc:
                if exc.status not in (400, 404, 429, 503):
                    raise
                failure = exc
                continue
            if forwarded.response.status < 500 or i == len(targets) - 1:
                return forwarded
            forwarded.response.close()
            failure = forwarded
        if isinstance(failure, errors.APIError) or failure is None:
            raise failure or errors.model_not_found(str(payload.get("model")))
        return failure

    def requested_model(self, payload: dict) -> tuple[str, errors.APIError | None]:
        """The request's model id, checked here once; an endpoint's own ids (Ollama's
        ``llama3.2:1b``) and a hosted provider's (``openai:gpt-4o``) may hold characters
        llmlb's ids do not: then also why llmlb's own nodes refuse it."""
        try:
            return requested_model(payload), None
        except errors.APIError as exc:
            model = payload.get("model")
            if isinstance(model, str) and self.cluster.endpoint_model(model):
                return model.lower(), exc
            raise

    # --- choosing ---------------------------------------------------------------------------

    def candidates(self, request: ProxyRequest, prefix: routing.LazyPrefix | None = None,
                   ) -> list[Member]:
        """The members to try, in order (``prefix``: the request's, for affinity); 404 for a
        model no one knows, 503 when no node that could serve it is up."""
        model_id = request.model_id
        members = self.cluster.members((ONLINE,))
        ready = [m for m in members if m.ready(model_id, request)]
        if ready and self.settings.endpoint_max_requests:
            room = [m for m in ready if not self._full(m)]
            if not room:
                raise errors.endpoints_full(model_id, self.settings.endpoint_max_requests)
            ready = room
        if ready:
            cut = prefix() if prefix is not None and len(ready) > 1 else None
            if cut is None:
                return routing.least_busy(ready, self.cluster.load)
            warm = routing.warmth(cut, self.prefixes.where(cut.keys))
            return routing.with_affinity(ready, lambda m: m.id, self.cluster.load, warm,
                                         self.settings.affinity_load_factor, cut.tie)
        if provider_of(model_id) is not None:  # a hosted provider's, cooling down
            raise errors.no_node_available(model_id, self._retry_after(
                self.cluster.members((COOLDOWN,))))
        # Nobody has it ready: a member that can fetch it does (LB-4), one pull per model.
        entry = self.catalog.get(model_id)
        has_files = self.has_files(request)
        order = placement.pullers(members, model_id, entry, has_files, self.registry)
        if order:
            return order
        down = self.cluster.members((OFFLINE, COOLDOWN))
        if entry is None and not has_files and not any(m.ready(model_id) for m in down):
            raise errors.model_not_found(model_id)
        why = None if any(m.ready(model_id) for m in down) else \
            "no online node has it or may fetch it"
        raise errors.no_node_available(model_id, self._retry_after(down), why)

    def _full(self, member: Member) -> bool:
        """An endpoint holding its most requests (LLMLB_ENDPOINT_MAX_REQUESTS): it queues
        whatever it gets, so the balancer bounds that queue. A first look, to route around
        it; ``_over_cap`` decides, once this request is counted."""
        return member.kind == ENDPOINT and self.cluster.inflight.load(member.id) >= \
            self.settings.endpoint_max_requests

    def _over_cap(self, member: Member) -> bool:
        cap = self.settings.endpoint_max_requests
        return bool(cap) and member.kind == ENDPOINT and self.cluster.inflight.load(member.id) > cap

    def _retry_after(self, down: list[Member]) -> int:
        now = time.time()
        ends = [m.record.cooldown_until - now for m in down
                if isinstance(m, RemoteMember) and m.status == COOLDOWN]
        return math.ceil(min(ends)) if ends else math.ceil(self.settings.heartbeat_seconds)

    # --- trying -------------------------------------------------------------------------------

    def _attempt(self, order: list[Member], request: ProxyRequest,
                 prefix: routing.LazyPrefix | None = None) -> Forwarded:
        inflight = self.cluster.inflight
        relayed: Forwarded | None = None  # the last node error, relayed if no one does better
        reason = None
        full = False
        for member in order:
            remote = isinstance(member, RemoteMember)
            inflight.enter(member.id)
            if self._over_cap(member):  # counted first, then checked: never over the cap
                inflight.leave(member.id)
                full = True
                continue
            try:
                response = self.translator.send(member, request)
                if request.as_sent is not None and _refused_usage(response):
                    # A server that refuses the stream_options llmlb added (an older one):
                    # the client's own request, as it sent it.
                    response = member.node.send(request.as_sent)
            except NodeUnreachable as exc:
                inflight.leave(member.id)
                reason = str(exc)
                self._failed(member, reason)
                continue
            except Exception as exc:  # a remote member failing as nobody foresaw: the next
                if not remote:        # one serves, never a 500 for everyone (SC-8)
                    raise
                inflight.leave(member.id)
                log.exception("Asking %s %s failed", member.kind, member.name)
                reason = f"{member.kind} {member.name}: {type(exc).__name__}"
                self._failed(member, reason)
                continue
            status = response.status
            if status >= 500 or (remote and status in (401, 403, 429)):
                response.close()
                inflight.leave(member.id)
                if status in (401, 403):  # it refused our credentials: our problem, not the client's
                    reason = (f"{member.kind} {member.name} refused the balancer's credentials "
                              f"({status}); " + ("check its API key" if member.kind
                                                 in (ENDPOINT, PROVIDER)
                                                 else "it registers again with its next "
                                                 "heartbeat"))
                    self._failed(member, reason)
                    continue
                # Overloaded (429, 503): its Retry-After sets the cooldown; the client sees
                # that answer only when no other candidate is left.
                reason = f"{member.kind} {member.name} answered {status}"
                wait = (retry_after(response.header("Retry-After")) if status in (429, 503)
                        else None)
                self._failed(member, reason, wait)
                relayed = Forwarded(member.name, response)
                continue
            if remote and member.record.failures:
                self.registry.record_success(member.id)  # type: ignore[union-attr]
            if prefix is not None and prefix.value is not None and status == 200:
                self.prefixes.record(prefix.value.kept, member.id)  # its cache holds them
            if not response.streaming:
                inflight.leave(member.id)
                return Forwarded(member.name, response)
            chunks = iter(response.body)
            try:  # the first chunk is still before the first byte to the client
                first = next(chunks, b"")
            except NodeUnreachable as exc:
                response.close()
                inflight.leave(member.id)
                reason = str(exc)
                self._failed(member, reason)
                continue
            done = _Once(response.close, lambda m=member.id: inflight.leave(m))
            body = self._relay(member, first, chunks, request.operation)
            return Forwarded(member.name, NodeResponse(status, response.headers, body, done))
        if relayed is not None:
            return relayed
        if full and reason is None:
            raise errors.endpoints_full(request.model_id, self.settings.endpoint_max_requests)
        down = [m for m in self.cluster.members((COOLDOWN,))]
        raise errors.no_node_available(request.model_id, self._retry_after(down), reason)

    def _relay(self, member: Member, first: bytes, chunks: Iterator[bytes],
               operation: str) -> Iterator[bytes]:
        """The node's stream as it comes; a node that breaks off gets the stream ended
        properly: an error event (then ``[DONE]`` for chat), in the API's own shape."""
        tail = first
        if first:
            yield first
        try:
            for chunk in chunks:
                if chunk:
                    tail = chunk
                    yield chunk
            if stream_ended(operation, tail):
                return
            cause = "the stream ended before its last event"
        except NodeUnreachable as exc:
            cause = str(exc)
        self._failed(member, cause)
        log.warning("Stream from node %s broke off: %s", member.name, cause)
        separator = b"" if tail.endswith(b"\n\n") or not tail else b"\n\n"
        yield separator + stream_error(operation, errors.node_failed(member.name, cause))

    def _failed(self, member: Member, reason: str, wait: float | None = None) -> None:
        if not isinstance(member, RemoteMember) or self.registry is None:
            return  # the in-process node has no network to cool down
        seconds = self.registry.record_failure(member.id, reason, wait)
        log.warning("Node %s failed (%s): no traffic for %.1fs", member.name, reason, seconds)

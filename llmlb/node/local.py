"""The models of this process: where a request's model is (its files, looked up once per
request), leasing the loaded model, and running one inference call on it.

This is the one place llmlb calls engines, so it is also where their exceptions become API
errors (``invalid_prompt``, ``context_length_exceeded``, ``engine_failed``): everything above speaks ``APIError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from engines.base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    ContextOverflow,
    EngineError,
    GenerationEvent,
    InvalidPrompt,
)

from .. import errors
from ..balancer.upstream import ProxyRequest
from ..resolver import Resolver
from ..serving.inference import InferenceCall
from ..storage import LocalModel
from .pool import Lease, ModelPool

log = logging.getLogger(__name__)

OPERATION_NAMES = {CHAT: "chat completions", COMPLETION: "text completions",
                   EMBEDDINGS: "embeddings"}


@contextmanager
def engine_errors(operation: str) -> Iterator[None]:
    """Engines' exceptions, raised running ``operation``, as the API errors they mean."""
    try:
        yield
    except ContextOverflow as exc:
        raise errors.context_length_exceeded(
            exc.prompt_tokens, exc.context_length, exc.at_least,
            param="prompt" if operation == COMPLETION else "messages") from exc
    except InvalidPrompt as exc:
        param = getattr(exc, "param", "messages")
        if operation == COMPLETION and param == "messages":
            param = "prompt"  # engines name the chat field unless told otherwise
        raise errors.invalid_prompt(str(exc), param) from exc
    except EngineError as exc:
        log.exception("The engine failed")
        raise errors.engine_failed(str(exc)) from exc


def files_here(resolver: Resolver, request: ProxyRequest) -> LocalModel | None:
    """The request's model as this host's model directories hold it, read from the disk once
    per request (kept in ``request.found``): asking whether it is ready here, whether this
    host has its files and running it all take that one look."""
    if resolver not in request.found:
        request.found[resolver] = resolver.find(request.model_id)
    return request.found[resolver]  # type: ignore[return-value]


class Generation:
    """Engine events of one call; the model stays leased until the iteration ends or
    ``close()`` is called (both release it, whichever comes first)."""

    def __init__(self, lease: Lease, events: Iterator[GenerationEvent], operation: str) -> None:
        self._lease, self._events, self._operation = lease, events, operation

    def __iter__(self) -> Iterator[GenerationEvent]:
        try:
            with engine_errors(self._operation):
                yield from self._events
        finally:
            self.close()

    def close(self) -> None:
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
        finally:
            self._lease.release()


class LocalNode:
    """Runs calls on this process's engines: ``runner(request)`` is serving's ``Runner`` for
    one request, with the model it found."""

    def __init__(self, resolver: Resolver, pool: ModelPool) -> None:
        self.resolver = resolver
        self.pool = pool

    def runner(self, request: ProxyRequest) -> RequestRunner:
        return RequestRunner(self, files_here(self.resolver, request))

    def model(self, model_id: str, found: LocalModel | None) -> LocalModel:
        """The model's files: those already found, else fetched from a source (or the error
        that says why not)."""
        return found if found is not None else self.resolver.fetch(model_id)

    def lease(self, model: LocalModel, call: InferenceCall) -> Lease:
        """The loaded model, leased for ``call``, once the call is known to suit it."""
        self._check_parameters(model, call)
        lease = self.pool.lease(model)
        if call.operation not in lease.model.capabilities:
            lease.release()
            raise errors.unsupported_operation(model.id, OPERATION_NAMES[call.operation])
        return lease

    def _check_parameters(self, model: LocalModel, call: InferenceCall) -> None:
        """A 400 before loading anything when the call uses a parameter the model's engine
        does not declare (never a silent drop)."""
        engine = self.pool.engine_for(model)
        if call.params is None or engine is None:
            return  # no engine: loading says so
        for param in call.params.requested():
            if param not in engine.parameters:
                raise errors.unsupported_parameter(param, engine.name, model.id)


class RequestRunner:
    """Serving's ``Runner`` for one request: its model as found when the request came in."""

    def __init__(self, node: LocalNode, found: LocalModel | None) -> None:
        self._node, self._found = node, found

    def generate(self, call: InferenceCall) -> Generation:
        lease = self._node.lease(self._node.model(call.model_id, self._found), call)
        try:
            with engine_errors(call.operation):
                if call.operation == CHAT:
                    events = lease.model.chat(call.messages, call.params)
                else:
                    events = lease.model.complete(call.prompt, call.params)
        except BaseException:
            lease.release()
            raise
        return Generation(lease, events, call.operation)

    def embed(self, call: InferenceCall) -> tuple[list[list[float]], int]:
        lease = self._node.lease(self._node.model(call.model_id, self._found), call)
        with lease as loaded, engine_errors(call.operation):
            return loaded.embed(call.texts)

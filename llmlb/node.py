"""The in-process node: finds a model's files (through the resolver), leases the loaded model
and runs one inference call on it. The balancer's dispatcher hands calls to nodes; this is
the node that lives in the same process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engines.base import (
    CHAT,
    COMPLETION,
    EMBEDDINGS,
    GenerationEvent,
    InvalidPrompt,
    SamplingParams,
)

from . import errors
from .model_pool import Lease, ModelPool
from .resolver import Resolver
from .storage import InvalidFileName, InvalidModelId, LocalModel, normalize_model_id, path_inside

OPERATION_NAMES = {CHAT: "chat completions", COMPLETION: "text completions",
                   EMBEDDINGS: "embeddings"}


@dataclass(frozen=True)
class InferenceCall:
    """One request for a node, free of HTTP: what to run, on which model, with what."""

    operation: str  # CHAT | COMPLETION | EMBEDDINGS
    model_id: str
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    texts: list[str] = field(default_factory=list)
    params: SamplingParams | None = None


class Generation:
    """Engine events of one call; the model stays leased until the iteration ends or
    ``close()`` is called (both release it, whichever comes first)."""

    def __init__(self, lease: Lease, events: Iterator[GenerationEvent]) -> None:
        self._lease, self._events = lease, events

    def __iter__(self) -> Iterator[GenerationEvent]:
        try:
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
    name = "local"

    def __init__(self, resolver: Resolver, pool: ModelPool) -> None:
        self.resolver = resolver
        self.pool = pool

    def models(self) -> list[LocalModel]:
        return self.resolver.list_models()

    def find(self, model_id: str) -> LocalModel | None:
        return self.resolver.find(model_id)

    def blob_path(self, rest: str) -> Path:
        """The file named by ``<model-id>/<filename>`` (either may contain '/'), refusing
        anything outside the model's directory and llmlb's own dot files."""
        parts = rest.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                model_id = normalize_model_id("/".join(parts[:cut]))
            except InvalidModelId:
                continue
            model = self.find(model_id)
            if model is None:
                continue
            name = "/".join(parts[cut:])
            try:  # NUL bytes, '..', dot files, symlinks leading outside: never a path
                path = path_inside(model.path, name)
            except InvalidFileName as exc:
                raise errors.invalid_request(f"Invalid file name {name!r}: {exc}",
                                             "filename") from None
            if path.is_file():
                return path
            raise errors.file_not_found(model_id, name)
        raise errors.model_not_found("/".join(parts[:-1]), in_catalog_hint=False)

    def run(self, call: InferenceCall) -> Generation | tuple[list[list[float]], int]:
        model = self.resolver.resolve(call.model_id)
        self._check_parameters(model, call)
        lease = self.pool.lease(model)
        if call.operation not in lease.model.capabilities:
            lease.release()
            raise errors.unsupported_operation(model.id, OPERATION_NAMES[call.operation])
        if call.operation == EMBEDDINGS:
            with lease as loaded:
                return loaded.embed(call.texts)
        try:
            if call.operation == CHAT:
                events = lease.model.chat(call.messages, call.params)
            else:
                events = lease.model.complete(call.prompt, call.params)
        except BaseException as exc:
            lease.release()
            if isinstance(exc, InvalidPrompt) and call.operation == COMPLETION \
                    and exc.param == "messages":
                exc.param = "prompt"  # engines name the chat field unless told otherwise
            raise
        return Generation(lease, events)

    def _check_parameters(self, model: LocalModel, call: InferenceCall) -> None:
        """A 400 before loading anything when the call uses a parameter the model's engine
        does not declare (never a silent drop)."""
        engine = self.pool.engine_for(model)
        if call.params is None or engine is None:
            return  # no engine: loading says so
        for param in call.params.requested():
            if param not in engine.parameters:
                raise errors.unsupported_parameter(param, engine.name, model.id)

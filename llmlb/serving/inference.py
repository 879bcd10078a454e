"""What serving asks of whoever runs the models: one inference call, free of HTTP, and the
``Runner`` that runs it (the node implements it; serving never imports the node)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from engines.base import GenerationEvent, SamplingParams


@dataclass(frozen=True)
class InferenceCall:
    """One request for a model: what to run (CHAT | COMPLETION | EMBEDDINGS, the engines'
    operations), on which model (its id as checked where the request came in), with what."""

    operation: str
    model_id: str
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    texts: list[str] = field(default_factory=list)
    params: SamplingParams | None = None


class Generation(Protocol):
    """The engine's events of one call; what it holds (the model's slot) is freed when the
    iteration ends or ``close()`` is called, whichever comes first."""

    def __iter__(self) -> Iterator[GenerationEvent]: ...

    def close(self) -> None: ...


class Runner(Protocol):
    """Runs calls on a model; errors are ``APIError``s."""

    def generate(self, call: InferenceCall) -> Generation:
        """Start a chat or text completion: the model is leased before this returns."""
        ...

    def embed(self, call: InferenceCall) -> tuple[list[list[float]], int]:
        """The embeddings of ``call.texts`` and the tokens they took."""
        ...

"""The engine contract every inference backend implements (built-in or plugin).

An ``Engine`` names the artifact formats it handles, says whether it can run here (and why
not), and ``load``s a model directory into a ``LoadedModel``. A loaded model generates by
yielding one ``Started`` event, then ``TokenText`` events (one per generated token), and ends
with one ``Finished`` event; llmlb's serving layer turns those into OpenAI responses, applies
stop sequences and counts usage, so engines stay small.

The rules an engine follows:

* **Prompt errors at call time.** ``chat`` and ``complete`` check the prompt (chat template,
  context length) before they return, and raise ``InvalidPrompt`` then; the returned iterator
  only generates. llmlb relies on this to answer a clean 400 instead of a broken stream.
* **Closing stops the work.** llmlb calls ``close()`` on the returned iterator when the client
  goes away or a stop sequence matched, possibly before iterating it at all; the engine must
  stop computing for that call at once (a plain generator is fine when its work only happens
  while iterated; ``engines.compute.stream`` handles both).
* **Concurrency.** ``LoadedModel.parallel`` says how many calls llmlb may run on the model at
  once; more wait in its queue (503 with ``Retry-After`` when the queue is full). 1, the
  default, means llmlb serialises calls and the engine needs no locks. An engine that batches
  sequences itself, or relays to a server that does, sets it higher: from
  ``LoadOptions.parallel_sequences`` when the operator set it, else from the memory its KV
  cache needs per sequence (``choose_parallel``), and reports the most it would give a model
  through ``Engine.parallel``.
* **The compute thread.** Heavy work on this machine — loading weights, forward passes,
  anything that calls into llama.cpp, torch or onnxruntime — runs on llmlb's one compute
  thread (``compute_call``, ``compute_stream``, or a ``ComputeRunner`` that steps a batch),
  never on the request's thread. Libraries built with OpenMP keep a thread team per calling
  thread; a second calling thread halves their speed (bench/RESULTS.md). Models share the
  thread in bounded steps, so keep each step short (a prompt chunk, one decoding step): a
  long step delays every other model. Tokenizing and detokenizing may run on the request's
  thread. Engines that only relay over the network need none of this.
* **Optional parameters.** ``Engine.parameters`` names the ``OPTIONAL_PARAMETERS`` (tools,
  structured outputs, logprobs, penalties…) its models honour; llmlb refuses a request using
  any other with a 400 naming it, so an engine never silently ignores one. The fields of
  ``SamplingParams`` say what each asks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# The compute-thread rule's tools, re-exported for plugins (see the module docstring).
from .compute import Runner as ComputeRunner  # noqa: F401
from .compute import call as compute_call  # noqa: F401
from .compute import stream as compute_stream  # noqa: F401


@dataclass(frozen=True)
class Availability:
    """Whether an engine can run on this machine; ``reason`` explains a no."""

    available: bool
    reason: str = ""
    device: str = "cpu"


#: The OpenAI request parameters beyond the basic ones (max_tokens, temperature, top_p, seed,
#: stop) that an engine may support; ``Engine.parameters`` names those it does. A request that
#: uses one its engine lacks is a 400 naming the parameter and the engine.
OPTIONAL_PARAMETERS = ("tools", "response_format", "logprobs", "top_logprobs",
                       "frequency_penalty", "presence_penalty", "repetition_penalty",
                       "logit_bias", "top_k", "min_p")


@dataclass(frozen=True)
class SamplingParams:
    """What one call asks of generation. The defaults ask nothing beyond plain sampling, so
    an engine that ignores a field at its default behaves exactly as before."""

    max_tokens: int | None = None  # None: as many as the context leaves room for
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counting the
    # tokens generated so far; repetition_penalty (vLLM/HF) divides the positive logits of
    # tokens already in prompt or output by it and multiplies the negative ones (1: off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    #: the generated text must be one JSON value matching this JSON schema (serialized JSON
    #: text); the engine constrains decoding to it and stops when the value is complete
    json_schema: str | None = None
    #: how many alternatives each ``TokenText.logprob`` lists; None: no logprobs at all
    top_logprobs: int | None = None
    #: OpenAI tool definitions ({"type": "function", "function": {...}}) for the chat
    #: template to render; llmlb parses the calls out of the text (or constrains them with
    #: ``json_schema``)
    tools: tuple[dict, ...] = ()

    def requested(self) -> list[str]:
        """The optional parameters (``OPTIONAL_PARAMETERS``) this call uses."""
        used = {"tools": bool(self.tools), "response_format": self.json_schema is not None,
                "logprobs": self.top_logprobs is not None,
                "top_logprobs": bool(self.top_logprobs),
                "frequency_penalty": self.frequency_penalty != 0,
                "presence_penalty": self.presence_penalty != 0,
                "repetition_penalty": self.repetition_penalty != 1,
                "logit_bias": bool(self.logit_bias), "top_k": self.top_k > 0,
                "min_p": self.min_p > 0}
        return [name for name in OPTIONAL_PARAMETERS if used[name]]


@dataclass(frozen=True)
class LoadOptions:
    """What llmlb's settings ask of every engine when it loads a model."""

    context_length: int = 4096  # per sequence; the model's own limit wins when smaller
    #: sequences one model may decode together (LLMLB_PARALLEL_SEQUENCES); None: the engine
    #: chooses (``choose_parallel``)
    parallel_sequences: int | None = None
    #: memory free where the model will live (VRAM with a GPU, else RAM) as it loads; None:
    #: unknown
    free_memory_bytes: int | None = None


#: Without LLMLB_PARALLEL_SEQUENCES a batching model gets as many sequences as the KV cache
#: of each (``context_length`` tokens) fits in ``KV_MEMORY_SHARE`` of the memory left free
#: after its weights, within these bounds: at least one, and no more than a CPU gains from
#: (batched decoding stops paying once the batch is compute-bound) while each waiting prompt
#: still gets its first token soon. ``UNKNOWN_MEMORY_PARALLEL`` when nothing is known.
AUTO_PARALLEL_MIN, AUTO_PARALLEL_MAX = 1, 8
KV_MEMORY_SHARE = 0.5
UNKNOWN_MEMORY_PARALLEL = 4


def choose_parallel(options: LoadOptions, weights_bytes: int,
                    kv_bytes_per_sequence: int | None, most: int) -> int:
    """Sequences one model decodes together: ``LoadOptions.parallel_sequences`` when set
    (at most ``most``), else what its KV cache allows (Ollama's rule, in a finer grain: it
    tries 4 sequences, then 1). At least 1."""
    if options.parallel_sequences is not None:
        return max(1, min(options.parallel_sequences, most))
    if not kv_bytes_per_sequence or options.free_memory_bytes is None:
        return max(1, min(UNKNOWN_MEMORY_PARALLEL, most))
    room = (options.free_memory_bytes - weights_bytes) * KV_MEMORY_SHARE
    fits = int(room // kv_bytes_per_sequence)
    return max(AUTO_PARALLEL_MIN, min(fits, AUTO_PARALLEL_MAX, most))


@dataclass(frozen=True)
class Started:
    """The first event: how many tokens the prompt has."""

    prompt_tokens: int


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's own text (undecodable bytes as U+FFFD)
    bytes: bytes
    logprob: float  # natural log of its probability under the model, before sampling rules


@dataclass(frozen=True)
class TokenLogprob:
    """The generated token's log-probability and the most likely alternatives, best first
    (``SamplingParams.top_logprobs`` of them)."""

    chosen: TopLogprob
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenText:
    """One generated token's text ('' while a multi-byte character is incomplete).

    ``tokens`` is how many generated tokens the event stands for: 0 for text flushed at the
    end that belongs to tokens already reported. ``logprob`` is set when the call asked for
    logprobs (``SamplingParams.top_logprobs`` is not None).
    """

    text: str
    tokens: int = 1
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    """The last event: why generation ended, "stop" (end of sequence) or "length".

    An engine that learns the true token counts only at the end (one relaying another server,
    say) may give them here; they replace llmlb's own counts.
    """

    reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


GenerationEvent = Started | TokenText | Finished

CHAT, COMPLETION, EMBEDDINGS = "chat", "completion", "embeddings"


class EngineError(RuntimeError):
    """A model cannot be loaded or run; the message is shown to the client."""


class InvalidPrompt(EngineError):
    """The request's prompt cannot be run (too long, rejected by the chat template);
    ``param`` is the request field at fault."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class ContextOverflow(InvalidPrompt):
    """The prompt does not fit the model's context: ``prompt_tokens`` (a lower bound when
    ``at_least``: counting stopped once it was certain) against ``context_length``."""

    def __init__(self, prompt_tokens: int, context_length: int, at_least: bool = False) -> None:
        more = "at least " if at_least else ""
        super().__init__(f"the prompt has {more}{prompt_tokens} tokens; this model's context "
                         f"holds {context_length}")
        self.prompt_tokens, self.context_length, self.at_least = (
            prompt_tokens, context_length, at_least)


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (libraries may list CUDA support without one)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def token_budget(prompt_tokens: int, context_length: int, max_tokens: int | None) -> int:
    """How many tokens may be generated after a prompt; InvalidPrompt if it fills the context."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ContextOverflow(prompt_tokens, context_length)
    return room if max_tokens is None else min(max_tokens, room)


class LoadedModel:
    """A model in memory. Implement the methods named in ``capabilities``."""

    capabilities: frozenset[str] = frozenset()
    context_length: int | None = None
    #: calls llmlb may run on this model at once (1: one at a time, the rest queue)
    parallel: int = 1
    #: memory its KV cache holds for all of those (``parallel`` x ``context_length``), when
    #: known; GET /v0/engines and the node's report show it with ``parallel``
    kv_cache_bytes: int | None = None

    def chat(self, messages: list[dict], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Generate the assistant's reply to OpenAI-style messages, using the chat template.

        Raise ``InvalidPrompt`` here, not from the iterator. Tokenize message contents as
        text: special-token strings a user writes must not become control tokens
        (``engines.prompt_tokens`` does this for tokenizers llmlb knows)."""
        raise EngineError("this model does not support chat completions")

    def complete(self, prompt: str, params: SamplingParams) -> Iterator[GenerationEvent]:
        """Continue a raw prompt."""
        raise EngineError("this model does not support text completions")

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embeddings for each text, and the number of tokens read."""
        raise EngineError("this model does not support embeddings")

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Free memory now, rather than when the object is collected."""


class Engine(ABC):
    """A backend for one or more artifact formats."""

    #: short name shown in GET /v0/engines
    name: str = ""
    #: the ``OPTIONAL_PARAMETERS`` its models honour (GET /v0/engines lists them); a request
    #: using any other gets a 400 before the engine sees it
    parameters: ClassVar[frozenset[str]] = frozenset()
    #: format name -> artifact file suffixes that mark a model directory of that format
    formats: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: whether, without LLMLB_PARALLEL_SEQUENCES, each model's number of sequences is chosen
    #: from the memory its KV cache needs (``choose_parallel``)
    parallel_from_memory: ClassVar[bool] = False

    @abstractmethod
    def availability(self) -> Availability:
        """Can this engine run here? Import its library lazily and say why not."""

    def parallel(self, options: LoadOptions) -> int:
        """The most sequences one model decodes together under ``options`` (GET /v0/engines
        shows it; each loaded model says what it got); 1 for engines that run one call at
        a time."""
        return 1

    @abstractmethod
    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        """Load the model in ``model_dir``; ``artifacts`` are its files of this format."""

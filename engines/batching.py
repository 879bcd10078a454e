"""What the batching engines share: one generation inside a batch (``Sequence``) and the
request's view of it (``SequenceStream``).

A batching engine tokenizes on the request's thread, checks the prompt against the context
(so a bad prompt fails when ``chat``/``complete`` is called), and hands a ``Sequence`` to its
runner on the compute thread. The runner pushes token ids and the end; the request's thread
turns them into ``Started`` / ``TokenText`` / ``Finished`` events, decoding text off the
compute thread. Closing the stream (the client went away, a stop sequence matched) cancels
the sequence: the runner drops it at its next step and its slot takes the next request.
"""

from __future__ import annotations

import codecs
import queue
from collections.abc import Callable, Iterator
from typing import Protocol

from .base import (
    EngineError,
    Finished,
    GenerationEvent,
    SamplingParams,
    Started,
    TokenText,
)
from .logit_rules import LogitRules, RawLogprob, token_logprob

_TOKEN, _END, _ERROR = 0, 1, 2


class Sequence:
    """One generation's state shared by the runner (compute thread) and the request."""

    def __init__(self, prompt: list[int], params: SamplingParams, max_new: int) -> None:
        self.prompt = prompt
        self.params = params
        self.max_new = max_new  # the token budget: max_tokens within the context
        self.produced = 0
        self.cancelled = False  # set by the request's thread, read by the runner
        #: penalties, bias, grammar and logprobs (``logit_rules``); None: plain sampling
        self.rules: LogitRules | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    # --- the runner's side (compute thread) -----------------------------------------------

    def push(self, token: int, logprob: RawLogprob | None = None) -> bool:
        """Hand over a generated token (with its logprobs when asked for); True when the
        budget is now spent."""
        self.produced += 1
        self._queue.put((_TOKEN, (token, logprob)))
        return self.produced >= self.max_new

    def finish(self, reason: str) -> None:
        self._queue.put((_END, reason))

    def fail(self, exc: BaseException) -> None:
        self._queue.put((_ERROR, exc))

    # --- the request's side ---------------------------------------------------------------

    def next_item(self) -> tuple[int, object]:
        return self._queue.get()

    def has_news(self) -> bool:
        return not self._queue.empty()


class TextDecoder(Protocol):
    """Token ids in, text deltas out, never splitting a multi-byte character."""

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


class PieceDecoder:
    """For tokenizers whose tokens are byte strings (llama.cpp): bytes joined, then UTF-8."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class SequenceStream(Iterator[GenerationEvent]):
    """The events of one sequence, for the request's thread. ``close()`` cancels it, also
    when iteration never began."""

    def __init__(self, sequence: Sequence, decoder: TextDecoder,
                 on_cancel: Callable[[], None],
                 token_bytes: Callable[[int], bytes] | None = None) -> None:
        self._seq, self._decoder, self._on_cancel = sequence, decoder, on_cancel
        self._token_bytes = token_bytes  # for logprobs: one token's bytes
        self._started = self._done = False
        self._final: Finished | None = None

    def __iter__(self) -> SequenceStream:
        return self

    def __next__(self) -> GenerationEvent:
        if not self._started:
            self._started = True
            return Started(len(self._seq.prompt))
        if self._final is not None:
            final, self._final = self._final, None
            return final
        if self._done:
            raise StopIteration
        kind, value = self._seq.next_item()
        if kind == _TOKEN:
            token, raw = value  # type: ignore[misc]
            text = self._decoder.push(token)
            if raw is None or self._token_bytes is None:
                return TokenText(text)
            return TokenText(text, logprob=token_logprob(raw, self._token_bytes))
        self._done = True
        tail = self._decoder.flush()
        if kind == _ERROR:
            if isinstance(value, EngineError):
                raise value
            raise EngineError(f"generation failed: {value}") from value  # type: ignore[misc]
        end = Finished(str(value))
        if tail:  # text of tokens already counted; the end comes with the next call
            self._final = end
            return TokenText(tail, tokens=0)
        return end

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._seq.cancelled = True
            self._on_cancel()

    def __del__(self) -> None:
        # Dropped without close() (a wrapper that forgot it): stop at the runner's next step.
        if not self._done:
            self._seq.cancelled = True

"""From engine events to text: stop sequences, finish reason and token usage, the same for
every engine (so engines need not implement stops)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from engines.base import Finished, GenerationEvent, Started, TokenLogprob, TokenText


class TextStream:
    """Iterate to get text deltas; afterwards ``finish_reason`` and the token counts are set.

    Text that might be the start of a stop sequence is held back until it is clear that it is
    not; when a stop sequence appears, the text before it is emitted and the engine is stopped.
    ``check`` runs after each token and may raise to stop the generation (the client left).
    """

    def __init__(self, events: Iterator[GenerationEvent], stops: list[str],
                 on_close: Callable[[], None] | None = None,
                 check: Callable[[], None] | None = None) -> None:
        self._events = events
        self._on_close = on_close
        self._check = check
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop sequence that ended the text
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._logprobs: list[TokenLogprob] = []  # of tokens read, not yet drained

    def __iter__(self) -> Iterator[str]:
        pending = ""
        try:
            for event in self._events:
                if isinstance(event, Started):
                    self.prompt_tokens = event.prompt_tokens
                    continue
                if isinstance(event, Finished):
                    self.finish_reason = event.reason
                    if event.prompt_tokens is not None:
                        self.prompt_tokens = event.prompt_tokens
                    if event.completion_tokens is not None:
                        self.completion_tokens = event.completion_tokens
                    break
                if not isinstance(event, TokenText):
                    continue
                if self._check is not None:
                    self._check()
                self.completion_tokens += event.tokens
                if event.logprob is not None:
                    self._logprobs.append(event.logprob)
                pending += event.text
                if not self._stops:
                    if pending:
                        yield pending
                    pending = ""
                    continue
                cut = self._first_stop(pending)
                if cut is not None:
                    if pending[:cut]:
                        yield pending[:cut]
                    self.stop_sequence = next(s for s in self._stops
                                              if pending.startswith(s, cut))
                    pending = ""
                    self.finish_reason = "stop"
                    return
                safe = len(pending) - self._held_suffix(pending)
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            if pending:
                yield pending
        finally:
            self.close()

    def drain_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens read since the last call (those of the text yielded
        so far, and of text held back for a possible stop sequence)."""
        out, self._logprobs = self._logprobs, []
        return out

    def close(self) -> None:
        """Stop the engine and free the model, also when iteration never began."""
        if self._on_close is not None:
            self._on_close()
            return
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop sequence."""
        for size in range(min(self._hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

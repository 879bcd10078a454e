"""What one sequence does to a step's logits before sampling, the same for every engine that
samples itself (llama.cpp through ``llama_sampling``, transformers through
``transformers_batch``): logprobs read first, then OpenAI's penalties, logit bias, and the
grammar mask of a JSON schema.

The logits are a numpy array (llama.cpp's own buffer, changed in place) or a torch tensor;
both index the same way, so one implementation serves both. A sequence that asks for none of
this has no ``LogitRules`` at all and samples exactly as before.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import InvalidPrompt, SamplingParams, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from .grammar import JsonConstraint

#: (token id, logprob, ((id, logprob), ...)): what the compute thread hands over per token;
#: the request's thread turns ids into text (``batching.SequenceStream``)
RawLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


class LogitRules:
    def __init__(self, params: SamplingParams, prompt: list[int],
                 constraint: JsonConstraint | None = None) -> None:
        self._frequency, self._presence = params.frequency_penalty, params.presence_penalty
        self._repetition = params.repetition_penalty
        self._bias = dict(params.logit_bias)
        self._counts: Counter[int] = Counter()  # generated tokens
        # repetition_penalty (HF, vLLM) also counts the prompt's tokens
        self._seen: set[int] = set(prompt) if self._repetition != 1 else set()
        self.constraint = constraint
        self.top_logprobs = params.top_logprobs

    @staticmethod
    def check_vocabulary(params: SamplingParams, n_vocab: int) -> None:
        """``InvalidPrompt`` (a 400 naming logit_bias) for a token id the model lacks."""
        for token, _ in params.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidPrompt(f"logit_bias names token {token}; this model's "
                                    f"vocabulary has ids 0 to {n_vocab - 1}", "logit_bias")

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        return bool(params.frequency_penalty or params.presence_penalty or params.logit_bias
                    or params.repetition_penalty != 1 or params.json_schema is not None
                    or params.top_logprobs is not None)

    def apply(self, logits) -> None:  # noqa: ANN001 - a 1-D numpy array or torch tensor
        """Change ``logits`` in place: penalties, bias, then the grammar mask."""
        import numpy as np

        def values(items: list[float]):  # noqa: ANN202 - an array of the logits' kind
            if isinstance(logits, np.ndarray):
                return np.asarray(items, dtype=logits.dtype)
            import torch

            return torch.tensor(items, dtype=logits.dtype, device=logits.device)

        n = logits.shape[0]
        if self._counts and (self._frequency or self._presence):
            ids = [t for t in self._counts if t < n]
            counts = values([float(self._counts[t]) for t in ids])
            logits[ids] -= counts * self._frequency + (counts > 0) * self._presence
        if self._seen and self._repetition != 1:
            ids = [t for t in self._seen if t < n]
            old, r = logits[ids], self._repetition
            logits[ids] = (old > 0) * (old / r) + (old <= 0) * (old * r)
        if self._bias:
            ids = [t for t in self._bias if t < n]
            logits[ids] += values([self._bias[t] for t in ids])
        if self.constraint is not None:
            banned = ~self.constraint.allowed(n)
            if isinstance(logits, np.ndarray):
                logits[banned] = -np.inf
            else:
                import torch

                logits.masked_fill_(torch.from_numpy(banned).to(logits.device), -math.inf)

    def accept(self, token: int) -> None:
        self._counts[token] += 1
        if self._repetition != 1:
            self._seen.add(token)
        if self.constraint is not None:
            self.constraint.consume(token)


class Logprobs:
    """A step's log-probabilities, read before any rule changes the logits."""

    def __init__(self, logits, top: int) -> None:  # noqa: ANN001 - numpy array or torch tensor
        import numpy as np

        if isinstance(logits, np.ndarray):
            values = logits.astype(np.float64)
            peak = float(values.max())
            self._all = values - (peak + math.log(float(np.exp(values - peak).sum())))
            idx = np.argpartition(-self._all, min(top, len(values) - 1))[:top] if top else []
            idx = sorted(idx, key=lambda i: (-self._all[i], i))
            self._top = tuple((int(i), float(self._all[i])) for i in idx)
        else:
            import torch

            self._all = torch.log_softmax(logits.float(), dim=-1)
            best, idx = torch.topk(self._all, top) if top else ([], [])
            self._top = tuple(zip((int(i) for i in idx), (float(v) for v in best), strict=True))

    def of(self, token: int) -> RawLogprob:
        return int(token), float(self._all[token]), self._top


def token_logprob(raw: RawLogprob, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """The event's form of what the compute thread handed over: ids become text."""
    token, logprob, top = raw

    def entry(t: int, lp: float) -> TopLogprob:
        data = token_bytes(t)
        return TopLogprob(data.decode("utf-8", errors="replace"), data, lp)

    return TokenLogprob(entry(token, logprob), tuple(entry(t, lp) for t, lp in top))

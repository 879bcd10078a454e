"""Constrained decoding with llguidance: the generated text must be one JSON value matching
a JSON schema (``SamplingParams.json_schema``: structured outputs, tool-call arguments).

One grammar engine for GGUF and transformers models: llguidance builds its tokenizer from a
Hugging Face tokenizer or a llama.cpp vocabulary, compiles a schema into a matcher per
sequence, and gives the set of tokens allowed next as a bitmask (tens of microseconds per
step, computed lazily from a lexer/parser split rather than by walking the vocabulary). The
engine sets every other token's logit to -inf before its own sampling, so penalties, top-k,
temperature and seeds work as usual on what is left; once the value is complete only the end
of sequence is allowed, and generation ends with "stop".

Whitespace is not free inside the JSON (``whitespace_flexible: false``): a model may not pad
the value with newlines until its budget is spent, and the output stays compact.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import InvalidPrompt

#: llguidance's JSON options: compact separators, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False}

if TYPE_CHECKING:
    import numpy as np


class GrammarCompiler:
    """A model's llguidance tokenizer (built on first use: it reads the whole vocabulary)
    and the matchers compiled against it."""

    def __init__(self, make_tokenizer: Callable[[], object]) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: object | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> object:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def matcher(self, json_schema: str) -> JsonConstraint:
        """A fresh constraint for one sequence; ``InvalidPrompt`` (a 400) when llguidance
        cannot compile the schema."""
        import llguidance

        tokenizer = self.tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json_schema,
                                                                    defaults=JSON_OPTIONS)
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise InvalidPrompt(f"the JSON schema cannot be used: {exc}",
                                "response_format") from None
        if matcher.is_error():
            raise InvalidPrompt(f"the JSON schema cannot be used: {matcher.get_error()}",
                                "response_format")
        return JsonConstraint(matcher, tokenizer)


class JsonConstraint:
    """One sequence's grammar state (used on the compute thread only)."""

    def __init__(self, matcher, tokenizer) -> None:  # noqa: ANN001 - llguidance objects
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._n_vocab = tokenizer.vocab_size
        self._eos = tokenizer.eos_token

    def allowed(self, n_logits: int) -> np.ndarray:
        """A boolean array over the model's ``n_logits`` logits (the model's output may be
        padded past the vocabulary): True where the token may come next."""
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        out = np.zeros(n_logits, dtype=bool)
        n = min(self._n_vocab, n_logits)
        out[:n] = bits[:n].astype(bool)
        if not out.any() and self._eos < n_logits:
            # the matcher failed (it never should): end the sequence rather than sample
            # from nothing
            out[self._eos] = True
        return out

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def failed(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


_available: bool | None = None


def available() -> bool:
    """Whether llguidance is installed (engines declare ``tools`` and ``response_format``
    only then)."""
    global _available
    if _available is None:
        try:
            import llguidance  # noqa: F401
            import llguidance.numpy  # noqa: F401
            _available = True
        except ImportError:
            _available = False
    return _available


#: the parameters that need a grammar engine
GRAMMAR_PARAMETERS = frozenset({"tools", "response_format"})


def schema_problem(schema: dict) -> str | None:
    """Why llguidance cannot compile ``schema`` (None: it can, or llguidance is not here and
    the engine will say so)."""
    if not available():
        return None
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return llguidance.LLMatcher.validate_grammar(grammar) or None

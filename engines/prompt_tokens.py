"""Prompts tokenized so that what users write stays text, while chat templates keep their
control tokens.

A chat template wraps each message in the model's control tokens (``<|im_start|>`` …). If the
rendered prompt were tokenized with special tokens parsed everywhere, a user writing
``<|im_end|>`` in a message would get a real control token (role injection), and llama.cpp's
special-token pass costs time quadratic in the number of them. So:

1. ``render_chat`` renders the messages and, only when some content or name holds
   special-token text, renders them once more with placeholders in their place, to learn
   where each user-supplied string sits in the prompt (its *spans*).
2. ``SpecialTokens.split`` cuts the prompt at the control tokens outside those spans —
   leftmost, longest first, honouring the tokens' lstrip/rstrip flags, as llama.cpp and
   Hugging Face tokenizers do — and the engine tokenizes the pieces between as plain text.

With no special-token text in user strings the result equals the library's own tokenization
of the whole prompt (``tests/test_prompt_safety.py`` checks it for every engine).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .base import ContextOverflow
from .textgen import plain_messages


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) of user text that must stay text


class SpecialTokens:
    """The control tokens of a vocabulary: their texts, ids and whitespace-stripping rules."""

    def __init__(self, tokens: dict[str, int], lstrip: Iterable[str] = (),
                 rstrip: Iterable[str] = ()) -> None:
        self.ids = {text: i for text, i in tokens.items() if text}
        self._lstrip, self._rstrip = frozenset(lstrip), frozenset(rstrip)
        texts = sorted(self.ids, key=len, reverse=True)  # longest first, like the libraries
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def occurs_in(self, text: object) -> bool:
        return bool(self._pattern and isinstance(text, str) and self._pattern.search(text))

    def split(self, text: str, spans: Sequence[tuple[int, int]] = ()) -> list[str | int]:
        """``text`` as plain-text pieces (str) and control tokens (int ids); occurrences that
        overlap a span are left inside the text."""
        if self._pattern is None:
            return [text] if text else []
        pieces: list[str | int] = []
        start = pos = span = 0
        while (match := self._pattern.search(text, pos)) is not None:
            begin, end = match.span()
            while span < len(spans) and spans[span][1] <= begin:
                span += 1
            if span < len(spans) and spans[span][0] < end:  # user text: stays text
                # Jump over the rest of it at once: a message of 100k of them costs one step.
                pos = spans[span][1] if begin >= spans[span][0] else begin + 1
                continue
            token = match.group()
            left = text[start:begin]
            if token in self._lstrip:
                left = left.rstrip()
            if left:
                pieces.append(left)
            pieces.append(self.ids[token])
            start = end
            if token in self._rstrip:
                while start < len(text) and text[start].isspace():
                    start += 1
            pos = start
        if text[start:]:
            pieces.append(text[start:])
        return pieces

    def encode(self, text: str, spans: Sequence[tuple[int, int]],
               encode_text: Callable[[str], list[int]],
               context_length: int | None = None) -> list[int]:
        """Token ids of ``text``: control tokens outside ``spans``, the rest as plain text.
        With ``context_length``, stop with ``InvalidPrompt`` as soon as it is exceeded."""
        ids: list[int] = []
        for piece in self.split(text, spans):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(encode_text(piece))
            if context_length is not None and len(ids) > context_length:
                raise ContextOverflow(len(ids), context_length, at_least=True)
        return ids


def refuse_if_too_long(text: str, max_token_bytes: int, context_length: int) -> None:
    """Before tokenizing: no token covers more than ``max_token_bytes`` bytes, so a text of N
    bytes has at least N / max_token_bytes tokens; refuse it at once when that is over the
    context (a megabyte of text costs nothing to refuse)."""
    at_least = len(text.encode("utf-8", errors="replace")) // max(1, max_token_bytes)
    if at_least > context_length:
        raise ContextOverflow(at_least, context_length, at_least=True)


def hf_max_token_bytes(tokenizer) -> int:  # noqa: ANN001 - tokenizers.Tokenizer
    """An upper bound on the bytes one token covers (the vocabulary's strings are at least as
    long, in UTF-8, as the bytes they stand for)."""
    return max((len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True)),
               default=1)


def hf_special_tokens(tokenizer) -> SpecialTokens:  # noqa: ANN001 - tokenizers.Tokenizer
    """The special added tokens of a Hugging Face ``tokenizers.Tokenizer``."""
    special = [(i, t) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
    return SpecialTokens({t.content: i for i, t in special},
                         [t.content for _, t in special if t.lstrip],
                         [t.content for _, t in special if t.rstrip])


def hf_text_tokenizer(tokenizer):  # noqa: ANN001, ANN201 - tokenizers.Tokenizer
    """A copy of a ``tokenizers.Tokenizer`` that reads special-token strings as plain text."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.encode_special_tokens = True
    return copy


def render_chat(render: Callable[[list[dict]], str], messages: Sequence[dict],
                specials: SpecialTokens) -> ChatPrompt:
    """Render ``messages`` with ``render`` (the model's chat template); spans mark the user
    strings that hold special-token text."""
    plain = plain_messages(messages)
    text = render(plain)
    fields = [(i, key) for i, m in enumerate(plain) for key in ("content", "name")
              if specials.occurs_in(m.get(key))]
    if not fields:
        return ChatPrompt(text)
    nonce = secrets.token_hex(6)  # placeholders no message can forge
    marked = [dict(m) for m in plain]
    for i, key in fields:
        marked[i][key] = f"\ue000{nonce}:{key}:{i}\ue001"
    skeleton = render(marked)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    size, last = 0, 0
    for match in re.finditer(f"\ue000{nonce}:(content|name):(\\d+)\ue001", skeleton):
        literal = skeleton[last:match.start()]
        value = str(plain[int(match.group(2))][match.group(1)])
        out += [literal, value]
        size += len(literal)
        spans.append((size, size + len(value)))
        size += len(value)
        last = match.end()
    out.append(skeleton[last:])
    rebuilt = "".join(out)
    # A template that rewrites user text (trims it, drops reasoning) cannot be followed
    # through placeholders; the untransformed text keeps the user's strings as text.
    return ChatPrompt(rebuilt, tuple(spans))

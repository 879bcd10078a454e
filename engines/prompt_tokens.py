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
        start, span = 0, 0
        for match in self._pattern.finditer(text):
            begin, end = match.span()
            while span < len(spans) and spans[span][1] <= begin:
                span += 1
            if span < len(spans) and spans[span][0] < end:
                continue  # user text: stays text
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
        if text[start:]:
            pieces.append(text[start:])
        return pieces

    def encode(self, text: str, spans: Sequence[tuple[int, int]],
               encode_text: Callable[[str], list[int]]) -> list[int]:
        """Token ids of ``text``: control tokens outside ``spans``, the rest as plain text."""
        ids: list[int] = []
        for piece in self.split(text, spans):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(encode_text(piece))
        return ids


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

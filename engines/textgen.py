"""Pieces the Hugging Face-tokenizer engines share: chat templates, incremental decoding,
and temperature/top-p sampling from logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# Used when a model ships no chat template at all: ChatML, the most widely understood one.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def message_text(content: Any) -> str:
    """OpenAI message content (a string or a list of text parts) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages with their content flattened to text, as chat templates expect."""
    return [{**m, "content": message_text(m.get("content"))} for m in messages]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def token_text(value: Any) -> str:
    """A special token from tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value or ""


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def with_tools(messages: list[dict], tools: Sequence[dict], template: str) -> list[dict]:
    """Messages for a template that cannot render tools itself: the tools described in a
    system message, asking for Hermes-style ``<tool_call>{...}</tool_call>`` calls (the
    format llmlb parses), and earlier calls written into their assistant message in that
    format. A template that mentions ``tools`` / ``tool_calls`` renders them its own way."""
    if "tool_calls" not in template:
        messages = [_calls_as_text(m) if m.get("tool_calls") else m for m in messages]
    if not tools or "tools" in template:
        return messages
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    note = ("You may call these tools:\n<tools>\n" + listing + "\n</tools>\nTo call one, "
            f"answer with {TOOL_CALL_OPEN}{{\"name\": <tool name>, \"arguments\": <arguments "
            f"object>}}{TOOL_CALL_CLOSE}.")
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": message_text(first.get("content")) + "\n\n" + note},
                *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _calls_as_text(message: dict) -> dict:
    calls = "".join(
        TOOL_CALL_OPEN + json.dumps({"name": c["function"]["name"],
                                     "arguments": c["function"]["arguments"]},
                                    ensure_ascii=False) + TOOL_CALL_CLOSE
        for c in message["tool_calls"])
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": message_text(message.get("content")) + calls}


class ChatTemplate:
    """Renders a Hugging Face chat template the way transformers does (sandboxed Jinja)."""

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template or FALLBACK_CHAT_TEMPLATE)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
        return self._template.render(messages=plain_messages(messages),
                                     add_generation_prompt=True, tools=tools or None,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


def _raise(message: str) -> None:
    raise ValueError(message)


class IncrementalDecoder:
    """Turns token ids into text deltas without splitting multi-byte characters or losing
    the spaces that tokenizers attach to the following token."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


def sample_next(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Pick the next token from 1-D numpy logits: greedy at temperature 0, else
    temperature-scaled softmax restricted to the top_p nucleus."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))

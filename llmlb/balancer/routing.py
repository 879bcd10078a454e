"""Which node gets a request (LB-2), as pure functions over the candidates and their loads.

- Candidates that have the model ready come first; when none has, the nodes that can fetch
  it, preferring one already pulling it and then the most free memory.
- Among ready candidates the least busy wins: requests in flight counted by the balancer
  (every worker) plus the queue the node reports.
- Prefix-aware affinity, as the approximate prefix-cache routing of llm-d's router and
  SGLang's cache-aware router do it: a request's prompt (its messages, serialized, or a
  completion's text) is cut into prefixes and each prefix hashed with everything before it
  (``prefix_of``). A shared record (``prefixes.PrefixRecord``) keeps which member served each
  recent prefix. The member holding the deepest prefix of a request takes it while that member
  stays within the load bound (``with_affinity``); a request with nothing warm anywhere goes
  to the least busy.

  Where the prompt is cut: at every message boundary, looked up only (a follow-up's earlier
  turns end at one), and on a fixed grid of byte offsets, looked up and recorded (blocks of
  ``BLOCK`` bytes, coarser the deeper: a long prompt costs a few dozen hashes, not one per
  block). What a served request records: its grid points and its end. So a follow-up finds its
  previous turn whatever its length; a new conversation shares a warm member only with a
  prefix of at least ``BLOCK`` bytes (a long system prompt or document), never a short
  "You are a helpful assistant." that saves nothing and would herd every conversation.

  The load bound, per Mirrokni, Thorup and Zadimoghaddam's bounded loads (2018): a member
  takes a request by affinity only while its load with the request stays within
  ``ceil(factor x average)``, and never while another candidate is idle and it is not (no
  member sits idle while another holds more than its share). Equally busy candidates are
  ordered by a hash of the conversation (its first turn), so new conversations spread over
  idle members the same way in every worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple, TypeVar

from ..dialects import MESSAGES, RESPONSES
from .upstream import CHAT, COMPLETION

T = TypeVar("T")
BLOCK = 512  # bytes (~128 tokens): the shortest shared prefix worth sending a request after
GRID_STEPS_PER_DOUBLING = 8  # grid points per doubling of the depth, once past 8 blocks
MAX_BOUNDARIES = 64  # message boundaries looked up: the deepest ones (follow-ups end there)


class Prefix(NamedTuple):
    """A request's prefixes: ``keys`` to look up with their ``depths`` (bytes), shallowest
    first; ``kept``: the keys to record once it is served; ``tie``: its conversation's hash,
    to order equally busy members."""

    keys: tuple[int, ...]
    depths: tuple[int, ...]
    kept: tuple[int, ...]
    tie: int


class LazyPrefix:
    """``prefix_of`` a request, computed on first use: only where there is a choice (two
    members or more have the model ready) is it worth hashing the prompt."""

    __slots__ = ("_request", "value")

    def __init__(self, operation: str, model_id: str, payload: dict) -> None:
        self._request: tuple[str, str, dict] | None = (operation, model_id, payload)
        self.value: Prefix | None = None  # once computed (None: not yet, or no prefix)

    def __call__(self) -> Prefix | None:
        if self._request is not None:
            self.value, self._request = prefix_of(*self._request), None
        return self.value


def _key(h: hashlib.blake2b) -> int:
    return int.from_bytes(h.copy().digest(), "little") | 1  # 0 marks an empty record slot


def grid() -> Iterator[int]:
    """The byte offsets where every prompt is cut: BLOCK apart for the first 8 blocks, then
    twice as far apart at each doubling of the depth."""
    step, position = BLOCK, 0
    while True:
        for _ in range(GRID_STEPS_PER_DOUBLING):
            position += step
            yield position
        step *= 2


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, an image's URL (or data)
        out = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                image = part.get("image_url")
                if isinstance(text, str):
                    out.append(text)
                elif isinstance(image, dict) and isinstance(image.get("url"), str):
                    out.append(image["url"])
        return "\x1d".join(out)
    return ""


def _dialect_messages(operation: str, payload: dict) -> object:
    """The Responses and Messages APIs' turns as chat's ``messages`` are cut: the system
    prompt (``instructions``, ``system``) first, then the items or messages."""
    if operation == RESPONSES:
        system, turns = payload.get("instructions"), payload.get("input")
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
    else:
        system, turns = payload.get("system"), payload.get("messages")
    if not isinstance(turns, list):
        return None
    return ([{"role": "system", "content": system}] if system else []) + turns


def _message(message: object) -> bytes | None:
    if not isinstance(message, dict):
        return None
    if "role" not in message:  # a Responses item: a function call, its output…
        return (json.dumps(message, sort_keys=True, default=str) + "\x1e").encode(
            "utf-8", "replace")
    content = message.get("content")
    text = f"{message.get('role')}\x1f{content if isinstance(content, str) else _text(content)}"
    if len(message) > 2:  # a name, tool calls, a tool call's id
        for extra in ("name", "tool_call_id"):
            if isinstance(message.get(extra), str):
                text += "\x1f" + message[extra]
        if message.get("tool_calls"):
            text += "\x1f" + json.dumps(message["tool_calls"], sort_keys=True, default=str)
    return (text + "\x1e").encode("utf-8", "replace")


def prefix_of(operation: str, model_id: str, payload: dict) -> Prefix | None:
    """The prefixes of a chat, Responses, Messages or completion prompt, or None (embeddings,
    token prompts)."""
    if operation in (CHAT, RESPONSES, MESSAGES):
        messages = (payload.get("messages") if operation == CHAT
                    else _dialect_messages(operation, payload))
        if not isinstance(messages, list) or not messages:
            return None
        pieces = [_message(m) for m in messages]
        if any(p is None for p in pieces):
            return None
        chunks: list[bytes] = pieces  # type: ignore[assignment]
        # The conversation: its first turn (system prompt and first user message).
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
    elif operation == COMPLETION:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            return None
        chunks, first = [prompt.encode("utf-8", "replace")], -1
    else:
        return None
    return _cut(model_id, chunks, boundaries=operation != COMPLETION, first=first)


def _cut(model_id: str, chunks: list[bytes], boundaries: bool, first: int) -> Prefix:
    h = hashlib.blake2b(model_id.encode() + b"\x00", digest_size=8)
    keys: list[int] = []
    depths: list[int] = []
    kept: list[int] = []  # the grid's
    cuts = grid()
    cut, position, last = next(cuts), 0, len(chunks) - 1
    for index, chunk in enumerate(chunks):
        size = len(chunk)
        if position + size < cut:  # the usual message: no grid point inside
            h.update(chunk)
            position += size
        else:
            view, start = memoryview(chunk), 0
            while position + size - start >= cut:
                h.update(view[start:start + cut - position])
                start += cut - position
                position = cut
                key = _key(h)
                keys.append(key)
                depths.append(position)
                kept.append(key)
                cut = next(cuts)
            h.update(view[start:])
            position += size - start
        if (boundaries or index == last) and (not depths or depths[-1] != position):
            keys.append(_key(h))
            depths.append(position)
        if index == first:
            tie = keys[-1]
    if first < 0:
        tie = keys[0]
    if not kept or kept[-1] != keys[-1]:
        kept.append(keys[-1])  # the end
    if len(keys) - len(kept) > MAX_BOUNDARIES:  # a very long conversation: its last turns
        grid_keys = set(kept)
        boundary = [i for i, k in enumerate(keys) if k not in grid_keys]
        dropped = set(boundary[:-MAX_BOUNDARIES])
        keys = [k for i, k in enumerate(keys) if i not in dropped]
        depths = [d for i, d in enumerate(depths) if i not in dropped]
    return Prefix(tuple(keys), tuple(depths), tuple(kept), tie)


def warmth(prefix: Prefix, served: Sequence[int | None]) -> dict[int, int]:
    """Per member, the deepest prefix (bytes) it served, from the record's answer for each of
    ``prefix.keys`` (the member, or None)."""
    warm: dict[int, int] = {}
    for member, depth in zip(served, prefix.depths, strict=True):
        if member is not None and depth > warm.get(member, 0):
            warm[member] = depth
    return warm


def least_busy(candidates: Sequence[T], load: Callable[[T], int],
               tie: Callable[[T], int] | None = None) -> list[T]:
    """Candidates by load; equal loads in ``tie`` order, or at random (so idle nodes share
    sequential requests)."""
    if tie is None:
        return sorted(candidates, key=lambda c: (load(c), random.random()))
    return sorted(candidates, key=lambda c: (load(c), tie(c)))


def capacity(loads: Sequence[int], factor: float) -> int:
    """The most requests one node may hold with the new one counted: ceil(factor x average)."""
    return max(1, math.ceil(factor * (sum(loads) + 1) / len(loads)))


def with_affinity(candidates: Sequence[T], ident: Callable[[T], int], load: Callable[[T], int],
                  warm: Mapping[int, int], factor: float, tie: int) -> list[T]:
    """The candidates in the order to try: the member holding the deepest warm prefix among
    those within the load bound, then the others by load (equal loads by the conversation's
    hash)."""
    loads = {ident(c): load(c) for c in candidates}
    bound = capacity(list(loads.values()), factor)
    anyone_idle = min(loads.values()) == 0
    chosen, best = None, (0, 0)
    for c in candidates:
        depth, held = warm.get(ident(c), 0), loads[ident(c)]
        if depth and held + 1 <= bound and (held == 0 or not anyone_idle) \
                and (depth, -held) > best:
            chosen, best = c, (depth, -held)
    rest = least_busy([c for c in candidates if c is not chosen], lambda c: loads[ident(c)],
                      lambda c: hash((tie, ident(c))))
    return ([chosen] if chosen is not None else []) + rest


def by_free_memory(candidates: Sequence[T], free: Callable[[T], int], pulling: Callable[[T], bool],
                   required: Callable[[T], int]) -> list[T]:
    """Nodes to fetch a model on: one already pulling it, then those it fits in (``required``
    there: a node's own settings may change what the model takes), most free memory first,
    then the rest (a model without a known size fits anywhere)."""
    return sorted(candidates, key=lambda c: (not pulling(c), free(c) < required(c), -free(c)))

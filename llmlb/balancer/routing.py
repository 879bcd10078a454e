"""Which node gets a request (LB-2), as pure functions over the candidates and their loads.

- Candidates that have the model ready come first; when none has, the nodes that can fetch
  it, preferring one already pulling it and then the most free memory.
- Among ready candidates the least busy wins: requests in flight counted by the balancer
  (every worker) plus the queue the node reports.
- Conversation affinity: a request is hashed by its model and first messages (the part every
  turn of a conversation repeats) onto a ring of the candidates, so the turns of one
  conversation meet the node whose prompt cache holds them. Bounded-load consistent hashing
  (Mirrokni, Thorup, Zadimoghaddam 2018) keeps that from overloading a node: a node takes the
  request only while its load stays within ``factor`` times the average; otherwise the next
  node on the ring does.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..dialects import MESSAGES, RESPONSES
from .upstream import CHAT, COMPLETION

T = TypeVar("T")
POINTS_PER_NODE = 64  # virtual nodes: spreads conversations evenly over a few nodes
PROMPT_PREFIX_CHARS = 512  # a completion prompt's part that identifies its conversation


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)
                       and isinstance(p.get("text"), str))
    return ""


def _dialect_messages(operation: str, payload: dict) -> object:
    """The Responses and Messages APIs' turns as chat's ``messages`` are hashed: the system
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


def conversation_key(operation: str, model_id: str, payload: dict) -> int | None:
    """A hash shared by the turns of one conversation, or None (embeddings)."""
    h = hashlib.blake2b(model_id.encode(), digest_size=8)
    if operation in (CHAT, RESPONSES, MESSAGES):
        messages = (payload.get("messages") if operation == CHAT
                    else _dialect_messages(operation, payload))
        if not isinstance(messages, list) or not messages:
            return None
        # The system prompt and first user message: what every later turn starts with.
        for message in messages:
            if not isinstance(message, dict):
                return None
            role = str(message.get("role"))
            h.update(b"\x00" + role.encode() + b"\x01"
                     + _text(message.get("content")).encode("utf-8", "replace"))
            if role == "user":
                break
    elif operation == COMPLETION:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return None
        h.update(b"\x02" + prompt[:PROMPT_PREFIX_CHARS].encode("utf-8", "replace"))
    else:
        return None
    return int.from_bytes(h.digest(), "big")


class Ring:
    """Consistent hash ring over node names."""

    def __init__(self, names: Sequence[str]) -> None:
        points = sorted((_hash(f"{name}#{i}".encode()), name)
                        for name in names for i in range(POINTS_PER_NODE))
        self._hashes = [p[0] for p in points]
        self._names = [p[1] for p in points]
        self.size = len(set(names))

    def preference(self, key: int) -> list[str]:
        """Node names in ring order from the key's position, each once."""
        start = bisect.bisect_left(self._hashes, key)
        seen: list[str] = []
        n = len(self._names)
        for i in range(n):
            name = self._names[(start + i) % n]
            if name not in seen:
                seen.append(name)
                if len(seen) == self.size:
                    break
        return seen


class _RingCache:
    """Rings by the set of candidate names (which nodes hold a model changes rarely)."""

    def __init__(self, size: int = 64) -> None:
        self._rings: OrderedDict[tuple[str, ...], Ring] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, names: tuple[str, ...]) -> Ring:
        with self._lock:
            ring = self._rings.get(names)
            if ring is not None:
                self._rings.move_to_end(names)
                return ring
        ring = Ring(names)
        with self._lock:
            self._rings[names] = ring
            while len(self._rings) > self._size:
                self._rings.popitem(last=False)
        return ring


_rings = _RingCache()


def least_busy(candidates: Sequence[T], load: Callable[[T], int]) -> list[T]:
    """Candidates by load, ties in random order (so idle nodes share sequential requests)."""
    return sorted(candidates, key=lambda c: (load(c), random.random()))


def capacity(loads: Sequence[int], factor: float) -> int:
    """The most requests one node may hold with the new one counted: ceil(factor x average)."""
    return max(1, math.ceil(factor * (sum(loads) + 1) / len(loads)))


def with_affinity(candidates: Sequence[T], name: Callable[[T], str], load: Callable[[T], int],
                  key: int, factor: float) -> list[T]:
    """The candidates in the order to try: the first node on the key's ring path whose load
    stays within the bound, then the others by load."""
    if len(candidates) < 2:
        return list(candidates)
    by_name = {name(c): c for c in candidates}
    loads = {n: load(c) for n, c in by_name.items()}
    bound = capacity(list(loads.values()), factor)
    chosen = None
    for node_name in _rings.get(tuple(sorted(by_name))).preference(key):
        if loads[node_name] + 1 <= bound:
            chosen = by_name[node_name]
            break
    rest = least_busy([c for c in candidates if c is not chosen], lambda c: loads[name(c)])
    return ([chosen] if chosen is not None else []) + rest


def by_free_memory(candidates: Sequence[T], free: Callable[[T], int], pulling: Callable[[T], bool],
                   required: Callable[[T], int]) -> list[T]:
    """Nodes to fetch a model on: one already pulling it, then those it fits in (``required``
    there: a node's own settings may change what the model takes), most free memory first,
    then the rest (a model without a known size fits anywhere)."""
    return sorted(candidates, key=lambda c: (not pulling(c), free(c) < required(c), -free(c)))

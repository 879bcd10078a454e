"""Which member pulls a model that no one has ready (LB-4, HB-2): one rule for a request that
names it (``proxy``) and for a pull an admin asks for (``hub``).

- Who may: a member that can fetch it (from the catalog's sources, or from this balancer's
  copy), where the model is in the catalog or here at all; the in-process member's own
  resolver decides for itself.
- In what order: one already pulling it, then those it fits in (its required memory against
  their free memory), most free memory first, then the rest (``routing.by_free_memory``).
- Once: where there is a choice, the pulls table (``registry.assign_pull``) keeps the first
  worker's pick while it is still a sound one (the member can fetch it, and pulls it already
  or has the memory for it), so every worker's requests and the hub's pull go to one member,
  and the model is downloaded once.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..catalog import CatalogModel
from . import routing
from .members import Member
from .registry import NodeRegistry


def required_memory(entry: CatalogModel | None) -> int:
    """The memory the model needs where it runs; 0 (fits anywhere) when it is unknown."""
    return entry.required_memory_bytes if entry is not None else 0


def pullers(members: Sequence[Member], model_id: str, entry: CatalogModel | None,
            has_files: bool, registry: NodeRegistry | None) -> list[Member]:
    """The members to fetch the model on, the one to ask first first; [] when none can.
    ``entry``: the model's catalog entry; ``has_files``: whether this host has its files."""
    able = [m for m in members if (entry is not None or has_files or m.in_process)
            and m.can_fetch(model_id, has_files)]
    required = required_memory(entry)
    free = {m.id: m.free_memory() for m in able}
    pulling = {m.id for m in able if m.pulling(model_id)}
    order = routing.by_free_memory(able, lambda m: free[m.id], lambda m: m.id in pulling,
                                   required)
    if registry is not None and len(order) > 1:
        # The pick stands while it is still a sound one: pulling it, or the model fits there
        # (or fits nowhere).
        sound = {m.id for m in order if m.id in pulling or free[m.id] >= required}
        puller = registry.assign_pull(model_id, order[0].id, sound or set(free))
        order.sort(key=lambda m: m.id != puller)
    return order

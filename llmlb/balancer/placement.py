"""Which member pulls a model that no one has ready (LB-4, HB-2): one rule for a request that
names it (``proxy``) and for a pull an admin asks for (``hub``).

- Who may: a member that can fetch it (from the catalog's sources, or from this balancer's
  copy), where the model is in the catalog or here at all; the in-process member's own
  resolver decides for itself.
- In what order: one already pulling it, then those it fits in (its required memory against
  their free memory), most free memory first, then the rest (``routing.by_free_memory``).
- What it requires (``required_memory``, the one place it is computed): the catalog's
  ``required_vram_mb`` for the weights, plus the KV cache of the sequences the member would
  decode at once: ``kv_cache_bytes_per_token`` × the member's context length × its
  ``LLMLB_PARALLEL_SEQUENCES`` for the model's format, or × 1 where the member chooses the
  number from its memory (it then runs as many as fit, at least one).
- Once: where there is a choice, the pulls table (``registry.assign_pull``) keeps the first
  worker's pick while it is still a sound one (the member can fetch it, and pulls it already
  or has the memory for it), so every worker's requests and the hub's pull go to one member,
  and the model is downloaded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..catalog import CatalogModel
from . import routing
from .members import Member
from .registry import NodeRegistry
from .reports import NodeReport, Report


@dataclass(frozen=True)
class Requirement:
    """The memory a model needs on one member: its weights, and the KV cache of ``sequences``
    sequences of ``context`` tokens each (0 when the catalog or the member does not say)."""

    weights: int
    kv_cache: int = 0
    sequences: int = 0
    context: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def required_memory(entry: CatalogModel | None, report: Report | None = None) -> Requirement:
    """What the model needs where it runs, on the member that sent ``report`` (its engines
    and load settings; None: the weights alone); nothing (fits anywhere) when unknown."""
    if entry is None:
        return Requirement(0)
    weights = entry.required_memory_bytes
    if not entry.kv_cache_bytes_per_token or not isinstance(report, NodeReport):
        return Requirement(weights)
    options = report.load_options
    if not options.context_length:  # a node that does not say (older): the weights alone
        return Requirement(weights)
    engine = next((e for e in report.engines if e.format == entry.format and e.active), None)
    if engine is not None and engine.parallel_auto:
        sequences = 1
    else:
        sequences = (engine.parallel if engine is not None else None) \
            or options.parallel_sequences or 1
    kv = entry.kv_cache_bytes_per_token * options.context_length * sequences
    return Requirement(weights, kv, sequences, options.context_length)


def required_on(member: Member, entry: CatalogModel | None) -> Requirement:
    """``required_memory`` on ``member`` (its report is asked for only where the catalog
    gives the model's KV cache)."""
    if entry is None or not entry.kv_cache_bytes_per_token:
        return required_memory(entry)
    return required_memory(entry, member.report())


def pullers(members: Sequence[Member], model_id: str, entry: CatalogModel | None,
            has_files: bool, registry: NodeRegistry | None) -> list[Member]:
    """The members to fetch the model on, the one to ask first first; [] when none can.
    ``entry``: the model's catalog entry; ``has_files``: whether this host has its files."""
    able = [m for m in members if (entry is not None or has_files or m.in_process)
            and m.can_fetch(model_id, has_files)]
    required = {m.id: required_on(m, entry).total for m in able}
    free = {m.id: m.free_memory() for m in able}
    pulling = {m.id for m in able if m.pulling(model_id)}
    order = routing.by_free_memory(able, lambda m: free[m.id], lambda m: m.id in pulling,
                                   lambda m: required[m.id])
    if registry is not None and len(order) > 1:
        # The pick stands while it is still a sound one: pulling it, or the model fits there
        # (or fits nowhere).
        sound = {m.id for m in order if m.id in pulling or free[m.id] >= required[m.id]}
        puller = registry.assign_pull(model_id, order[0].id, sound or set(free))
        order.sort(key=lambda m: m.id != puller)
    return order

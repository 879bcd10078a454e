"""Loaded models of this process (EN-4): reuse, idle unload, a cap, reload on change, and a
bounded number of calls at a time per model with a bounded queue.

A loaded model runs ``parallel`` calls at once (1 for engines that take one call at a time,
more for engines that batch sequences: ``LoadedModel.parallel``); every use holds one of its
slots. Requests that find all slots taken wait in line, and past ``max_queued_requests`` get a
503 with ``Retry-After`` at once. A ``Lease`` is taken before the response starts, so a busy
model is a clean error and never a broken stream; releasing it (the stream ended or its
client left) frees the slot at once for the next in line.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engines import compute
from engines.base import Engine, EngineError, LoadedModel, LoadOptions

from .. import errors
from ..config import InferenceSettings
from ..plugins import EngineRegistry
from ..storage import LocalModel
from .hardware import node_memory

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    model: LocalModel
    loaded: LoadedModel
    slots: threading.Semaphore = field(init=False)
    waiting: int = 0
    busy: int = 0
    last_used: float = field(default_factory=time.monotonic)
    stale: bool = False  # replaced by a newer load; unloaded when its last user leaves

    def __post_init__(self) -> None:
        self.slots = threading.Semaphore(self.parallel)

    @property
    def parallel(self) -> int:
        return max(1, int(getattr(self.loaded, "parallel", 1) or 1))

    @property
    def kv_cache_bytes(self) -> int | None:
        return getattr(self.loaded, "kv_cache_bytes", None)


class Lease:
    """The right to use one loaded model until ``release()`` (idempotent)."""

    def __init__(self, pool: ModelPool, entry: _Entry) -> None:
        self._pool, self._entry = pool, entry
        self.model = entry.loaded
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._entry)

    def __enter__(self) -> LoadedModel:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.release()


def load_options(settings: InferenceSettings) -> LoadOptions:
    """What every model is loaded with: its context, its batch."""
    return LoadOptions(context_length=settings.context_length,
                       parallel_sequences=settings.parallel_sequences)


class ModelPool:
    def __init__(self, registry: EngineRegistry, *, max_loaded: int, keep_alive: float,
                 max_queued: int, load_options: LoadOptions,
                 free_memory: Callable[[], int] = lambda: node_memory().free_bytes) -> None:
        self._registry = registry
        self._max_loaded, self._keep_alive, self._max_queued = max_loaded, keep_alive, max_queued
        self.options = load_options
        self._free_memory = free_memory  # where models live; engines size their KV cache by it
        self._entries: dict[str, _Entry] = {}
        self._mutex = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._janitor: threading.Thread | None = None
        self._stop = threading.Event()

    # --- public -----------------------------------------------------------------------------

    def lease(self, model: LocalModel) -> Lease:
        """Load (or reuse) the model and wait for its turn; raise APIError when not possible."""
        self._ensure_janitor()
        while True:
            entry = self._entry_for(model)
            with self._mutex:
                if entry.stale:  # unloaded between lookup and here: look again
                    continue
                # Refused only when every slot is taken and the line is full: with
                # max_queued 0, a free slot still serves.
                if entry.busy + entry.waiting >= entry.parallel + self._max_queued:
                    raise errors.model_busy(model.id)
                entry.waiting += 1
                break
        entry.slots.acquire()  # waiters are woken in arrival order
        with self._mutex:
            entry.waiting -= 1
            entry.busy += 1
        return Lease(self, entry)

    def loaded(self) -> list[dict]:
        with self._mutex:
            return [{"id": e.model.id, "format": e.model.format, "busy": bool(e.busy),
                     "active": e.busy, "parallel": e.parallel, "waiting": e.waiting,
                     # chosen at load from the memory its KV cache needs, or the setting
                     "parallel_auto": self.options.parallel_sequences is None
                     and e.kv_cache_bytes is not None,
                     "kv_cache_bytes": e.kv_cache_bytes,
                     "idle_seconds": round(time.monotonic() - e.last_used)}
                    for e in self._entries.values()]

    def unload_all(self) -> None:
        with self._mutex:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._unload(entry)
        self._stop.set()

    # --- internals ----------------------------------------------------------------------------

    def _entry_for(self, model: LocalModel) -> _Entry:
        with self._mutex:
            entry = self._entries.get(model.id)
            if entry and entry.model.fingerprint == model.fingerprint \
                    and entry.model.path == model.path:
                return entry
            load_lock = self._load_locks.setdefault(model.id, threading.Lock())
        with load_lock:  # one load per model at a time; others wait and reuse its result
            with self._mutex:
                entry = self._entries.get(model.id)
                if entry and entry.model.fingerprint == model.fingerprint \
                        and entry.model.path == model.path:
                    return entry
            if entry is not None:
                log.info("Model %s changed on disk; reloading", model.id)
                self._retire(entry)
            self._make_room()
            loaded = self._load(model)
            entry = _Entry(model, loaded)
            with self._mutex:
                self._entries[model.id] = entry
            return entry

    def engine_for(self, model: LocalModel) -> Engine | None:
        """The engine that runs (or would run) ``model``."""
        found = self._registry.for_format(model.format)
        return found.engine if found is not None else None

    def _load(self, model: LocalModel) -> LoadedModel:
        # The time a request waits for the model: the engine's first check imports its
        # library (llama_cpp, torch: seconds), so the clock starts before it.
        started = time.monotonic()
        found = self._registry.for_format(model.format)
        if found is None:
            raise errors.engine_unavailable(model.id, model.format, "no engine is registered")
        availability = self._registry.availability(found.engine)
        if not availability.available:
            raise errors.engine_unavailable(model.id, model.format, availability.reason)
        checked = time.monotonic()
        try:
            artifacts = [model.path / a for a in model.artifacts]
            options = replace(self.options, free_memory_bytes=self._free_memory())
            loaded = found.engine.load(model.path, artifacts, options)
        except EngineError as exc:
            log.error("Model %s could not be loaded from %s: %s", model.id, model.path, exc)
            raise errors.model_load_failed(model.id, str(exc)) from exc
        except MemoryError:
            raise errors.model_load_failed(model.id, "out of memory") from None
        done = time.monotonic()
        kv = getattr(loaded, "kv_cache_bytes", None)
        log.info("Model loaded successfully: %s (%s via %s, %d at a time%s, %.1fs: %.1fs "
                 "loading the engine, %.1fs the model)", model.id, model.format,
                 found.engine.name, getattr(loaded, "parallel", 1),
                 f", {kv / 2**20:.0f} MiB of KV cache" if kv else "", done - started,
                 checked - started, done - checked)
        return loaded

    def _retire(self, entry: _Entry) -> None:
        with self._mutex:
            if self._entries.get(entry.model.id) is entry:
                del self._entries[entry.model.id]
            entry.stale = True
            idle = entry.busy == 0 and entry.waiting == 0
        if idle:
            self._unload(entry)

    def _make_room(self) -> None:
        with self._mutex:
            live = list(self._entries.values())
        while len(live) >= self._max_loaded:
            idle = [e for e in live if e.busy == 0 and e.waiting == 0]
            if not idle:
                log.warning("All %d loaded models are busy; loading one more than "
                            "LLMLB_MAX_LOADED_MODELS allows", len(live))
                return
            victim = min(idle, key=lambda e: e.last_used)
            log.info("Unloading %s to make room (LLMLB_MAX_LOADED_MODELS=%d)",
                     victim.model.id, self._max_loaded)
            self._retire(victim)
            live.remove(victim)

    def _release(self, entry: _Entry) -> None:
        with self._mutex:
            entry.busy -= 1
            entry.last_used = time.monotonic()
            unload = entry.stale and entry.busy == 0 and entry.waiting == 0
        entry.slots.release()
        if unload:
            self._unload(entry)

    def _unload(self, entry: _Entry) -> None:
        try:
            # On the compute thread: behind any generation still finishing its last token
            # there (a cancelled stream), never under its feet.
            compute.call(entry.loaded.unload)
        except Exception:  # unloading must never break a request
            log.exception("Unloading %s failed", entry.model.id)
        gc.collect()  # models hold reference cycles: free their memory (and VRAM) now
        log.info("Model unloaded: %s", entry.model.id)

    def _ensure_janitor(self) -> None:
        if self._janitor is None or not self._janitor.is_alive():
            with self._mutex:
                if self._janitor is None or not self._janitor.is_alive():
                    self._janitor = threading.Thread(target=self._sweep, daemon=True,
                                                     name="llmlb-model-janitor")
                    self._janitor.start()

    def _sweep(self) -> None:
        interval = max(0.2, min(5.0, self._keep_alive / 4))
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._mutex:
                expired = [e for e in self._entries.values() if e.busy == 0
                           and e.waiting == 0 and now - e.last_used > self._keep_alive]
            for entry in expired:
                log.info("Model %s idle for %.0fs (LLMLB_KEEP_ALIVE_SECONDS); unloading",
                         entry.model.id, now - entry.last_used)
                self._retire(entry)

"""The model hub (HB): catalog statuses, pulls, deletes. No Flask here.

A status is derived, never stored: from the files (Ready), the resolver's lock and progress
record (Downloading, queued, failed) and the pull requests kept in SQLite (Registered). Every
worker process and every restart therefore sees the same truth; a pull cut off by a restart
is picked up again by ``reconcile`` instead of hanging in Downloading.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .catalog import Catalog
from .db import Database
from .dispatch import Dispatcher
from .hardware import Memory
from .hf_stats import HFStats
from .model_info import model_object
from .resolver import Resolver
from .resolver.progress import DOWNLOADING, ERROR, key

log = logging.getLogger(__name__)

AVAILABLE, REGISTERED, DOWNLOADING_, READY, ERROR_ = (
    "Available", "Registered", "Downloading", "Ready", "Error")
INTERRUPTED = "Download interrupted; it resumes when the model is pulled or requested again."


@dataclass(frozen=True)
class HubStatus:
    status: str
    progress: float | None = None
    error: str | None = None
    nodes: int = 0


class Hub:
    def __init__(self, db: Database, catalog: Catalog, resolver: Resolver,
                 dispatcher: Dispatcher, stats: HFStats,
                 memory: Callable[[], Memory]) -> None:
        self.db, self.catalog, self.resolver = db, catalog, resolver
        self.dispatcher, self.stats, self.memory = dispatcher, stats, memory

    # --- status -----------------------------------------------------------------------------

    def _registered(self) -> set[str]:
        return {r[0] for r in self.db.conn().execute("SELECT model_id FROM registrations")}

    def _ready(self) -> dict[str, int]:
        """Model id -> number of nodes that have it, from one listing (not one per model)."""
        return {model.id: len(nodes) for model, nodes in self.dispatcher.list_models()}

    def status_of(self, model_id: str, registered: set[str] | None = None,
                  ready: dict[str, int] | None = None) -> HubStatus:
        ready = self._ready() if ready is None else ready
        if model_id in ready:
            return HubStatus(READY, 1.0, nodes=ready[model_id])
        record = self.resolver.progress.read(model_id)
        if record is not None:
            running = self.resolver.download_state(model_id) == "running"
            if running:
                if record.status == DOWNLOADING:
                    return HubStatus(DOWNLOADING_, round(record.fraction, 4))
                return HubStatus(REGISTERED, 0.0)  # waiting for the node's download slot
            if record.status == ERROR:
                return HubStatus(ERROR_, round(record.fraction, 4), record.error_message)
            return HubStatus(ERROR_, round(record.fraction, 4), INTERRUPTED)
        registered = self._registered() if registered is None else registered
        return HubStatus(REGISTERED if model_id in registered else AVAILABLE)

    def list_models(self) -> list[dict]:
        catalog = self.catalog.models()
        registered, ready = self._registered(), self._ready()
        stats = self.stats.get_many(sorted({m.repo_id for m in catalog.values()}))
        items = []
        for entry in catalog.values():
            st = self.status_of(entry.id, registered, ready)
            item = {"model": entry.to_json(), "status": st.status,
                    "hf_stats": stats.get(entry.repo_id), "available_nodes": st.nodes}
            if st.progress is not None and st.status in (DOWNLOADING_, ERROR_):
                item["progress"] = st.progress
            if st.error:
                item["error"] = st.error
            items.append(item)
        return items

    def local_models(self) -> list[dict]:
        catalog = self.catalog.models()
        return [{**model_object(model, nodes), "in_catalog": model.id in catalog,
                 "deletable": model.source == "local", "path": str(model.path)}
                for model, nodes in self.dispatcher.list_models()]

    def snapshot(self) -> dict[str, tuple[str, int | None]]:
        """Each catalog model's status and whole-percent progress: what events report."""
        registered, ready = self._registered(), self._ready()
        out = {}
        for model_id in self.catalog.models():
            st = self.status_of(model_id, registered, ready)
            pct = int(st.progress * 100) if st.status == DOWNLOADING_ else None
            out[model_id] = (st.status, pct)
        return out

    # --- actions ----------------------------------------------------------------------------

    def register(self, model_id: str) -> dict:
        entry = self.catalog.get(model_id)
        if entry is None:
            raise errors.model_not_supported(model_id)
        current = self.status_of(model_id)
        if current.status in (READY, DOWNLOADING_):
            return {"model_id": model_id, "status": current.status}
        memory = self.memory()
        if entry.required_memory_bytes > memory.free_bytes:
            raise errors.insufficient_memory(entry.required_memory_bytes, memory.free_bytes)
        self.resolver.check_downloadable(model_id)
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO registrations(model_id, state, requested_at, updated_at) "
                         "VALUES (?, 'registered', ?, ?) ON CONFLICT(model_id) DO UPDATE SET "
                         "updated_at=excluded.updated_at", (model_id, now, now))
        self.resolver.progress.clear(model_id)  # a retry starts from a clean status
        self.resolver.start_download(model_id)
        log.info("Pull requested: %s", model_id)
        return {"model_id": model_id, "status": REGISTERED}

    def delete(self, model_id: str) -> dict:
        local = self.resolver.find(model_id)
        registered = model_id in self._registered()
        if self.resolver.download_state(model_id) == "running":
            raise errors.APIError(409, f"Model '{model_id}' is downloading; delete it when the "
                                  "download has ended", code="download_in_progress")
        if local is not None and local.source != "local":
            raise errors.APIError(400, f"Model '{model_id}' lives on the shared path "
                                  f"({local.path}); llmlb never deletes shared copies",
                                  code="shared_model")
        staging = self.resolver.settings.models_dir / ".downloads" / key(model_id)
        if local is None and not registered and not staging.exists() \
                and self.resolver.progress.read(model_id) is None:
            raise errors.model_not_found(model_id, in_catalog_hint=False)
        if local is not None:
            shutil.rmtree(local.path)
            log.info("Deleted local copy of %s (%s)", model_id, local.path)
        shutil.rmtree(staging, ignore_errors=True)
        self.resolver.progress.clear(model_id)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM registrations WHERE model_id=?", (model_id,))
        return {"model_id": model_id, "deleted": True,
                "status": AVAILABLE if self.catalog.get(model_id) else None}

    def reconcile(self) -> None:
        """Restart pulls that were requested but run nowhere (after a restart, say)."""
        for model_id in self._registered():
            if self.catalog.get(model_id) is None or self.resolver.find(model_id):
                continue
            record = self.resolver.progress.read(model_id)
            if record is not None and record.status == ERROR:
                continue  # shows Error until someone retries
            if self.resolver.download_state(model_id) == "idle":
                log.info("Resuming the pull of %s", model_id)
                self.resolver.start_download(model_id)

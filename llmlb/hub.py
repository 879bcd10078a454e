"""The model hub (HB): catalog statuses, pulls, deletes. No Flask here.

A status is derived, never stored: from the files (Ready), the resolver's lock and progress
record (Downloading, queued, failed) and the pull requests kept in the database
(Registered); the states themselves, and their HB-1 words, live in ``resolver/state.py``. Every
worker process and every restart therefore sees the same truth; a pull cut off by a restart
is picked up again by ``reconcile`` instead of hanging in Downloading.

On a balancer the nodes' reports count too: a model is Ready on the nodes that have it,
Downloading while a node pulls it; a pull goes where ``balancer/placement.py`` says (the
member with the most free memory for the model, unless one is already set to pull it), a
delete to every node holding it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass

from . import errors
from .balancer import placement
from .balancer.members import Cluster, Member, RemoteMember
from .balancer.registry import COOLDOWN, ONLINE
from .balancer.reports import Download
from .balancer.upstream import NodeUnreachable
from .catalog import Catalog, CatalogModel
from .hf_stats import HFStats
from .resolver import Resolver
from .resolver.progress import ERROR
from .resolver.state import (
    ABSENT,
    AVAILABLE,
    DOWNLOADING,
    FAILED,
    HUB_DOWNLOADING,
    HUB_ERROR,
    INTERRUPTED_MESSAGE,
    LOCAL,
    QUEUED,
    READY,
    REGISTERED,
    UNDER_WAY,
    ModelState,
)
from .state import State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubStatus:
    status: str
    progress: float | None = None
    error: str | None = None
    nodes: tuple[str, ...] = ()


class Hub:
    def __init__(self, db: State, catalog: Catalog, resolver: Resolver,
                 cluster: Cluster, stats: HFStats) -> None:
        self.db, self.catalog, self.resolver = db, catalog, resolver
        self.cluster, self.stats = cluster, stats

    # --- status -----------------------------------------------------------------------------

    def _registered(self) -> dict[str, str | None]:
        """Model id -> the remote node its pull was handed to (None: this process)."""
        return self.db.registrations.models()

    def _ready(self) -> dict[str, tuple[str, ...]]:
        """Model id -> the nodes that have it, from one listing (not one per model)."""
        return {entry.id: tuple(nodes) for entry, nodes in self.cluster.list_models()}

    def status_of(self, model_id: str, registered: dict[str, str | None] | None = None,
                  ready: dict[str, tuple[str, ...]] | None = None,
                  remote: dict[str, list[tuple[str, Download]]] | None = None) -> HubStatus:
        ready = self._ready() if ready is None else ready
        if model_id in ready:
            return HubStatus(READY, 1.0, nodes=ready[model_id])
        # The files are not here (the listing above includes this process's own node).
        here = self.resolver.state(model_id, files=False)
        if here.phase == ABSENT:
            remote = self.cluster.downloads() if remote is None else remote
            if remote.get(model_id):
                here = _remote_state([d for _, d in remote[model_id]])
        registered = self._registered() if registered is None else registered
        puller = registered.get(model_id)
        if here.phase == ABSENT and puller is not None and not self._up(puller):
            # The node it was handed to went offline (or away) mid-pull: nobody pulls it now.
            return HubStatus(HUB_ERROR, 0.0, f"The pull stopped: node '{puller}', which was "
                             "pulling it, is offline. Pull it again to use another node.")
        return _hub_status(here, model_id in registered)

    def _up(self, node: str) -> bool:
        return any(m.name == node for m in self.cluster.members((ONLINE, COOLDOWN)))

    def _views(self) -> tuple[dict[str, str | None], dict[str, tuple[str, ...]], dict]:
        return self._registered(), self._ready(), self.cluster.downloads()

    def list_models(self) -> list[dict]:
        catalog = self.catalog.models()
        registered, ready, remote = self._views()
        stats = self.stats.get_many(sorted({m.repo_id for m in catalog.values()}))
        items = []
        for entry in catalog.values():
            st = self.status_of(entry.id, registered, ready, remote)
            item = {"model": entry.to_json(), "status": st.status,
                    "hf_stats": stats.get(entry.repo_id), "available_nodes": len(st.nodes),
                    "nodes": list(st.nodes)}
            if st.progress is not None and st.status in (HUB_DOWNLOADING, HUB_ERROR):
                item["progress"] = st.progress
            if st.error:
                item["error"] = st.error
            items.append(item)
        return items

    def local_models(self) -> list[dict]:
        """Models on the nodes' disks (this process's own first), for the Local tab."""
        catalog = self.catalog.models()
        items = []
        for entry, nodes in self.cluster.list_models():
            here = self.resolver.find(entry.id) if self.cluster.local else None
            items.append({**entry.to_json(), "nodes": nodes, "in_catalog": entry.id in catalog,
                          "deletable": entry.owned_by == "local",
                          "path": str(here.path) if here else None})
        return items

    def snapshot(self) -> dict[str, tuple[str, int | None]]:
        """Each catalog model's status and whole-percent progress: what events report."""
        registered, ready, remote = self._views()
        out = {}
        for model_id in self.catalog.models():
            st = self.status_of(model_id, registered, ready, remote)
            pct = int(st.progress * 100) if st.status == HUB_DOWNLOADING else None
            out[model_id] = (st.status, pct)
        return out

    def download_status(self, model_id: str) -> str:
        """A catalog model's download state in the resolver's words (not_downloaded,
        downloading, error), here or on a node."""
        here = self.resolver.state(model_id)
        remote = self.cluster.downloads().get(model_id)
        if here.phase == ABSENT and remote:
            here = _remote_state([d for _, d in remote])
        return here.status_body()["status"]

    # --- actions ----------------------------------------------------------------------------

    def register(self, model_id: str) -> dict:
        entry = self.catalog.get(model_id)
        if entry is None:
            raise errors.model_not_supported(model_id)
        current = self.status_of(model_id)
        if current.status in (READY, HUB_DOWNLOADING):
            return {"model_id": model_id, "status": current.status}
        target = self._pull_target(model_id, entry)
        if isinstance(target, RemoteMember):
            try:
                status, body = self.cluster.call(target, "POST", "/v0/node/pull",
                                                 {"model_id": model_id})
            except NodeUnreachable as exc:
                raise errors.no_node_available(model_id, 5, str(exc)) from None
            if status >= 300:
                raise errors.relayed(status, body)
            self._record_registration(model_id, target.name)
            log.info("Pull requested: %s, on node %s", model_id, target.name)
            return {"model_id": model_id, "status": REGISTERED, "node": target.name}
        self.resolver.check_downloadable(model_id)
        self._record_registration(model_id)
        self.resolver.progress.clear(model_id)  # a retry starts from a clean status
        self.resolver.start_download(model_id)
        log.info("Pull requested: %s", model_id)
        return {"model_id": model_id, "status": REGISTERED}

    def _record_registration(self, model_id: str, node: str | None = None) -> None:
        """Remember the pull (``node``: the remote node that runs it; None: this process)."""
        self.db.registrations.record(model_id, node, time.time())

    def _pull_target(self, model_id: str, entry: CatalogModel) -> Member:
        """The member that pulls the model (``balancer/placement.py``: the same rule a
        request for it follows), if the model fits in its memory: its weights and the KV
        cache of the sequences that member would run at once."""
        has_files = self.resolver.find(model_id) is not None
        order = placement.pullers(self.cluster.members((ONLINE,)), model_id, entry, has_files,
                                  self.cluster.registry)
        if not order:
            raise errors.no_node_available(model_id, 5, "no node that can fetch it is online")
        target = order[0]
        need, free = placement.required_on(target, entry), target.free_memory()
        if need.total > free:
            raise errors.insufficient_memory(need.total, free, need.weights, need.kv_cache,
                                             need.sequences, need.context)
        return target

    def delete(self, model_id: str) -> dict:
        remote = [m for m in self.cluster.members((ONLINE, COOLDOWN))
                  if isinstance(m, RemoteMember) and (m.ready(model_id) or any(
                      d.model_id == model_id for d in m.downloads()))]
        local = self.resolver.find(model_id)
        registered = model_id in self._registered()
        if self.resolver.download_state(model_id) == "running":
            raise errors.download_in_progress(model_id)
        if local is not None and local.source != "local":
            raise errors.shared_model(model_id)
        staging = self.resolver.staging_dir(model_id)
        if local is None and not registered and not staging.exists() and not remote \
                and self.resolver.progress.read(model_id) is None:
            raise errors.model_not_found(model_id, in_catalog_hint=False)
        for member in remote:
            try:
                status, body = self.cluster.call(member, "DELETE", f"/v0/node/models/{model_id}")
            except NodeUnreachable as exc:
                raise errors.no_node_available(model_id, 5, str(exc)) from None
            if status >= 300 and status != 404:
                raise errors.relayed(status, body)
            log.info("Deleted %s on node %s", model_id, member.name)
        if local is not None:
            # Two deletes at once (two workers, two clicks): the other one removed it first,
            # and the outcome is the same.
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(local.path)
            log.info("Deleted local copy of %s (%s)", model_id, local.path)
        shutil.rmtree(staging, ignore_errors=True)
        self.resolver.progress.clear(model_id)
        self.db.registrations.forget(model_id)
        return {"model_id": model_id, "deleted": True,
                "status": AVAILABLE if self.catalog.get(model_id) else None}

    def reconcile(self) -> None:
        """Restart pulls of this process's that were requested but run nowhere (after a
        restart, say). A node's pulls are the node's to resume."""
        for model_id in self.db.registrations.local():
            if self.catalog.get(model_id) is None or self.resolver.find(model_id):
                continue
            record = self.resolver.progress.read(model_id)
            if record is not None and record.status == ERROR:
                continue  # shows Error until someone retries
            if self.resolver.download_state(model_id) == "idle":
                log.info("Resuming the pull of %s", model_id)
                self.resolver.start_download(model_id)


def _reported_state(download: Download) -> ModelState:
    """The state a node reported (its RS-7 status, in its heartbeat's downloads)."""
    phase = {"local": LOCAL, "not_downloaded": ABSENT, "error": FAILED}.get(
        download.status, QUEUED if download.queued else DOWNLOADING)
    total, done = download.total_bytes, download.downloaded_bytes
    if not total:  # an older report without byte counts: keep its fraction
        total, done = 10_000, int(download.progress * 10_000)
    error = (download.error_message or "The download failed on a node."
             if phase == FAILED else None)
    return ModelState(download.model_id, phase, done, total, error=error)


def _remote_state(downloads: list[Download]) -> ModelState:
    """A model's state from the downloads nodes report: the furthest one under way, else
    the first failure."""
    states = [_reported_state(d) for d in downloads]
    running = [s for s in states if s.phase in UNDER_WAY]
    if running:
        return max(running, key=lambda s: s.progress)
    return states[0]


def _hub_status(state: ModelState, registered: bool) -> HubStatus:
    status = state.hub_status(registered)
    if status == HUB_DOWNLOADING:
        return HubStatus(status, state.progress)
    if status == HUB_ERROR:
        error = state.error if state.phase == FAILED else INTERRUPTED_MESSAGE
        return HubStatus(status, state.progress, error)
    if status == REGISTERED:
        return HubStatus(status, 0.0)
    return HubStatus(status)

"""Model resolution (RS-2): ``find`` looks in the local directory, then the shared path (used
in place); ``fetch`` then downloads from an allowed source (the balancer's blob route, or
Hugging Face), else raises ``model_not_found``.

A download runs in a background thread of the process that wins the model's lock file, so it
carries on when the request that started it gives up; every request for the model, in any
thread, worker or node sharing ``models_dir``, waits for the files to appear (up to
``LLMLB_RESOLVE_WAIT_SECONDS``), then answers, or gets a 503 with the progress.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.utils import get_session

from .. import errors
from ..catalog import Catalog, CatalogModel
from ..config import ModelSettings, NodeSettings
from ..locks import FileLock
from ..storage import LocalModel, find_model, merged_listing
from . import state as model_state
from .download import Fetch, fetch_all
from .progress import DOWNLOADING, ERROR, QUEUED, Progress, ProgressStore, key
from .sources import BalancerSource, DownloadError, HuggingFaceSource, describe_failure
from .state import ModelState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
PROGRESS_EVERY_SECONDS = 0.2


@dataclass
class DownloadJob:
    model_id: str
    lock: FileLock
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class Resolver:
    def __init__(self, settings: ModelSettings, node: NodeSettings, catalog: Catalog,
                 formats: Callable[[], Mapping[str, tuple[str, ...]]]) -> None:
        self.settings = settings
        self.catalog = catalog
        self._formats = formats
        self.progress = ProgressStore(settings.locks_dir)
        self.hf = HuggingFaceSource(settings.hf_endpoint, settings.hf_token,
                                    settings.download_allowlist)
        self.balancer = (BalancerSource(node.balancer_urls, node.node_api_key,
                                        settings.download_allowlist)
                         if node.balancer_urls else None)
        self._jobs: dict[str, DownloadJob] = {}
        self._jobs_lock = threading.Lock()
        self._waiting = 0
        self._listeners: list[Callable[[str], None]] = []

    # --- what is here ---------------------------------------------------------------------

    def roots(self) -> list[tuple[Path | None, str]]:
        return [(self.settings.models_dir, "local"), (self.settings.shared_models_dir, "shared")]

    def list_models(self) -> list[LocalModel]:
        return merged_listing(self.roots(), self._formats())

    def find(self, model_id: str) -> LocalModel | None:
        """The model's files if they are here already: local first, then shared (in place)."""
        for root, source in self.roots():
            model = find_model(root, model_id, source, self._formats())
            if model is not None:
                return model
        return None

    def staging_dir(self, model_id: str) -> Path:
        """Where a download of the model collects its files until they are all complete."""
        return self.settings.models_dir / ".downloads" / key(model_id)

    def model_lock(self, model_id: str) -> FileLock:
        return FileLock(self.settings.locks_dir / f"{key(model_id)}.lock")

    def on_progress(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(model_id)`` whenever a download of this process changes state."""
        self._listeners.append(listener)

    # --- resolving ------------------------------------------------------------------------

    def fetch(self, model_id: str) -> LocalModel:
        """Resolve a model that ``find`` did not find here: from an allowed source, waiting
        for it, or raise the error that says why not."""
        self.check_downloadable(model_id)
        log.info("Model resolution started: %s", model_id)
        return self._wait_for(model_id)

    def check_downloadable(self, model_id: str) -> None:
        """Raise model_not_found unless some allowed source can provide the model."""
        entry = self.catalog.get(model_id)
        if entry is not None and self.hf.allowed:
            return
        if self.balancer is not None:
            try:
                if self.balancer.plan(model_id):
                    return
            except DownloadError as exc:  # a manifest this node refuses to follow
                raise errors.download_failed(str(exc)) from None
        if entry is not None:
            raise errors.model_not_allowed(model_id, self.hf.host)
        raise errors.model_not_found(model_id)

    def _wait_for(self, model_id: str) -> LocalModel:
        with self._jobs_lock:
            if self._waiting >= self.settings.max_resolve_waiters:
                raise errors.model_downloading(model_id, self._fraction(model_id))
            self._waiting += 1
        try:
            deadline = time.monotonic() + self.settings.resolve_wait_seconds
            waited_on_other = False
            while True:
                model = self.find(model_id)
                if model is not None:
                    return model
                if waited_on_other:
                    # The other process's download ended without the files: report its error
                    # rather than start over inside this same request.
                    record = self.progress.read(model_id)
                    lock = self.model_lock(model_id)
                    if record and record.status == ERROR and not lock.held_elsewhere():
                        raise errors.download_failed(record.error_message or "unknown error")
                job = self.start_download(model_id)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.model_downloading(model_id, self._fraction(model_id))
                if job is None:
                    waited_on_other = True
                    time.sleep(min(POLL_SECONDS, remaining))
                    continue
                finished = job.done.wait(timeout=min(POLL_SECONDS, remaining))
                if finished and job.error and self.find(model_id) is None:
                    raise errors.download_failed(job.error)
        finally:
            with self._jobs_lock:
                self._waiting -= 1

    def _fraction(self, model_id: str) -> float:
        record = self.progress.read(model_id)
        return record.fraction if record else 0.0

    # --- downloading ----------------------------------------------------------------------

    def start_download(self, model_id: str) -> DownloadJob | None:
        """Start downloading in this process unless it runs here already (returns that job)
        or elsewhere (returns None)."""
        with self._jobs_lock:
            job = self._jobs.get(model_id)
            if job is not None and not job.done.is_set():
                return job
            lock = self.model_lock(model_id)
            if not lock.try_acquire():
                return None
            job = DownloadJob(model_id, lock)
            self._jobs[model_id] = job
        threading.Thread(target=self._run, args=(job,), name=f"llmlb-download-{model_id}",
                         daemon=True).start()
        return job

    def download_state(self, model_id: str) -> str:
        """"running" here or elsewhere, or "idle"."""
        with self._jobs_lock:
            job = self._jobs.get(model_id)
            if job is not None and not job.done.is_set():
                return "running"
        return "running" if self.model_lock(model_id).held_elsewhere() else "idle"

    def _notify(self, model_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(model_id)
            except Exception:  # a listener must never break a download
                log.exception("Progress listener failed")

    def _run(self, job: DownloadJob) -> None:
        model_id = job.model_id
        entry = self.catalog.get(model_id)
        record = Progress(model_id, QUEUED, total_bytes=entry.size_bytes if entry else 0)
        try:
            if self.find(model_id) is not None:
                return  # another node finished it between our check and our lock
            self.progress.write(record)
            self._notify(model_id)
            slot = FileLock(self.settings.locks_dir / f"download-{os.uname().nodename}.lock")
            slot.acquire()  # one download at a time per node: the others stay queued
            try:
                self._download(entry, record)
            finally:
                slot.release()
        except Exception as exc:
            job.error = describe_failure(exc)
            log.error("Download failed: %s: %s", model_id, job.error)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                # A partial download that filled the disk would keep it full for everything
                # else on it (the database, other models): give the space back. A retry,
                # once there is room, starts over.
                shutil.rmtree(self.staging_dir(model_id), ignore_errors=True)
            _remove_empty_dirs(self.staging_dir(model_id))
            record.status, record.error_message = ERROR, job.error
            try:
                self.progress.write(record)
            except OSError:  # the job keeps the error for this process's state()
                log.exception("Could not record the failure of %s", model_id)
        finally:
            job.lock.release()
            job.done.set()
            self._notify(model_id)

    def _download(self, entry: CatalogModel | None, record: Progress) -> None:
        model_id = record.model_id
        files, source = None, None
        if self.balancer is not None:
            files, source = self.balancer.plan(model_id), self.balancer
        if not files:
            if entry is None:
                raise DownloadError(f"no source has model '{model_id}' any more")
            if not self.hf.allowed:
                raise DownloadError(f"{self.hf.host} is not in LLMLB_DOWNLOAD_ALLOWLIST")
            source = self.hf
            log.info("Model not found locally, downloading from %s...", source.name)
            files = source.plan(entry)
        else:
            log.info("Model not found locally, downloading from %s...", source.name)
        total = sum(f.size for f in files)
        staging = self.staging_dir(model_id)
        staging.mkdir(parents=True, exist_ok=True)
        have = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        free = shutil.disk_usage(staging).free
        if total - have > free:
            raise DownloadError(f"Not enough disk space: need {(total - have) / 1e6:.1f} MB, "
                                f"{free / 1e6:.1f} MB free in the models directory")
        record.status, record.total_bytes, record.downloaded_bytes = DOWNLOADING, total, 0
        self.progress.write(record)
        self._notify(model_id)

        state = {"logged_tenth": 0, "written_at": 0.0, "written_pct": -1}

        def report(n: int) -> None:
            record.downloaded_bytes += n
            pct = int(record.fraction * 100)
            now = time.monotonic()
            due = now - state["written_at"] >= PROGRESS_EVERY_SECONDS
            if pct != state["written_pct"] and (due or pct == 100):
                state["written_at"], state["written_pct"] = now, pct
                self.progress.write(record)
                self._notify(model_id)
            while state["logged_tenth"] < pct // 10:  # one line per 10% step passed
                state["logged_tenth"] += 1
                log.info("Download progress: %d%% (%.1f MB / %.1f MB)",
                         state["logged_tenth"] * 10, record.downloaded_bytes / 1e6, total / 1e6)

        fetch = Fetch(get_session(), self.settings.download_timeout_seconds, source.allows,
                      source.name)
        fetch_all(fetch, files, staging, report)
        target = self.settings.models_dir.joinpath(*model_id.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, target)  # the model appears whole, or not at all
        except OSError:
            if self.find(model_id) is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
        self.progress.clear(model_id)
        log.info("Download completed: %s", model_id)

    # --- state (resolver/state.py) ----------------------------------------------------------

    def state(self, model_id: str, *, files: bool = True) -> ModelState:
        """The model's state here; ``files=False`` skips looking for its files (the caller
        knows they are not here)."""
        model = self.find(model_id) if files else None
        if model is not None:
            return ModelState(model_id, model_state.LOCAL, model.size_bytes, model.size_bytes,
                              local_path=model.path)
        record = self.progress.read(model_id)
        if record is None:
            entry = self.catalog.get(model_id)
            return ModelState(model_id, model_state.ABSENT, 0, entry.size_bytes if entry else 0)
        error = record.error_message
        if record.status == ERROR:
            phase = model_state.FAILED
        elif self.download_state(model_id) == "idle":
            with self._jobs_lock:
                job = self._jobs.get(model_id)
            # A failure this process ran but could not write down is still a failure.
            phase = model_state.FAILED if job and job.error else model_state.INTERRUPTED
            error = job.error if job and job.error else error
        else:
            phase = model_state.QUEUED if record.status == QUEUED else model_state.DOWNLOADING
        return ModelState(model_id, phase, record.downloaded_bytes, record.total_bytes,
                          error=error)

    def status(self, model_id: str) -> dict:
        """RS-7's status body; 404 for a model that is neither here nor in the catalog."""
        current = self.state(model_id)
        if current.phase == model_state.ABSENT and self.catalog.get(model_id) is None:
            raise errors.model_not_found(model_id)
        return current.status_body()


def _remove_empty_dirs(root: Path) -> None:
    """What a failed download leaves of its staging directory, when it holds no file."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()

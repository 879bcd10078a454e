"""Hugging Face download and like counts for the catalog (HB-1), cached in the shared state
for every worker (``state.records.HubStats``). Reading never waits for the hub: stale entries are refreshed by a background thread,
one repository at a time with a short timeout, so the model list stays fast (with null stats)
when the hub is slow or unreachable."""

from __future__ import annotations

import logging
import threading
import time

from .state import State

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER = 300.0  # seconds before an unreachable hub is asked again
CLAIM_SECONDS = 60.0  # a worker's claim on a refresh, so workers do not all fetch one repo


class HFStats:
    def __init__(self, db: State, endpoint: str, token: str | None, ttl: float,
                 timeout: float, enabled: bool = True) -> None:
        self.db, self.endpoint, self.token = db, endpoint, token
        self.ttl, self.timeout, self.enabled = ttl, timeout, enabled
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self._unreachable_until = 0.0

    def get_many(self, repo_ids: list[str]) -> dict[str, dict | None]:
        rows = self.db.hf_stats.all()
        now = time.time()
        stats: dict[str, dict | None] = {}
        stale = False
        for repo in repo_ids:
            row = rows.get(repo)
            if row is None or now - row["fetched_at"] > (self.ttl if row["ok"] else
                                                          min(self.ttl, RETRY_FAILED_AFTER)):
                stale = True
            stats[repo] = ({"downloads": row["downloads"], "stars": row["likes"]}
                           if row is not None and row["ok"] else None)
        if stale and self.enabled:
            self._refresh_in_background(repo_ids)
        return stats

    def _refresh_in_background(self, repo_ids: list[str]) -> None:
        with self._mutex:
            if self._thread is not None and self._thread.is_alive() or \
                    time.monotonic() < self._unreachable_until:
                return
            self._thread = threading.Thread(target=self._refresh, args=(list(repo_ids),),
                                             name="llmlb-hf-stats", daemon=True)
            self._thread.start()

    def _claim(self, repo: str) -> bool:
        return self.db.hf_stats.claim(repo, time.time(), self.ttl,
                                      min(self.ttl, RETRY_FAILED_AFTER), CLAIM_SECONDS)

    def _refresh(self, repo_ids: list[str]) -> None:
        import httpx2
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        for repo in repo_ids:
            if not self._claim(repo):
                continue
            unreachable = False
            try:
                info = api.model_info(repo, timeout=self.timeout)
                values = (info.downloads, info.likes, True)
            except Exception as exc:  # unreachable, private, renamed: stats stay null
                log.debug("No Hugging Face stats for %s: %s", repo, exc)
                values = (None, None, False)
                unreachable = isinstance(exc, httpx2.TransportError)
            self.db.hf_stats.store(repo, *values, time.time())
            if unreachable:  # the hub is down: stop here and leave it alone for a while
                self._unreachable_until = time.monotonic() + RETRY_FAILED_AFTER
                return

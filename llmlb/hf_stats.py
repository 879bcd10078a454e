"""Hugging Face download and like counts for the catalog (HB-1), cached in SQLite for every
worker. Reading never waits for the hub: stale entries are refreshed by a background thread,
one repository at a time with a short timeout, so the model list stays fast (with null stats)
when the hub is slow or unreachable."""

from __future__ import annotations

import logging
import threading
import time

from .db import Database

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER = 300.0  # seconds before an unreachable hub is asked again
CLAIM_SECONDS = 60.0  # a worker's claim on a refresh, so workers do not all fetch one repo


class HFStats:
    def __init__(self, db: Database, endpoint: str, token: str | None, ttl: float,
                 timeout: float, enabled: bool = True) -> None:
        self.db, self.endpoint, self.token = db, endpoint, token
        self.ttl, self.timeout, self.enabled = ttl, timeout, enabled
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self._unreachable_until = 0.0

    def get_many(self, repo_ids: list[str]) -> dict[str, dict | None]:
        rows = {r["repo_id"]: r for r in self.db.conn().execute(
            "SELECT repo_id, downloads, likes, ok, fetched_at FROM hf_stats")}
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
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT ok, fetched_at, claimed_at FROM hf_stats WHERE repo_id=?",
                               (repo,)).fetchone()
            if row is not None:
                fresh = now - row["fetched_at"] <= (self.ttl if row["ok"] else
                                                    min(self.ttl, RETRY_FAILED_AFTER))
                claimed = row["claimed_at"] and now - row["claimed_at"] < CLAIM_SECONDS
                if fresh or claimed:
                    return False
                conn.execute("UPDATE hf_stats SET claimed_at=? WHERE repo_id=?", (now, repo))
            else:
                conn.execute("INSERT INTO hf_stats(repo_id, ok, fetched_at, claimed_at) "
                             "VALUES (?, 0, 0, ?)", (repo, now))
        return True

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
                values = (info.downloads, info.likes, 1)
            except Exception as exc:  # unreachable, private, renamed: stats stay null
                log.debug("No Hugging Face stats for %s: %s", repo, exc)
                values = (None, None, 0)
                unreachable = isinstance(exc, httpx2.TransportError)
            with self.db.transaction() as conn:
                conn.execute("UPDATE hf_stats SET downloads=?, likes=?, ok=?, fetched_at=?, "
                             "claimed_at=NULL WHERE repo_id=?", (*values, time.time(), repo))
            if unreachable:  # the hub is down: stop here and leave it alone for a while
                self._unreachable_until = time.monotonic() + RETRY_FAILED_AFTER
                return

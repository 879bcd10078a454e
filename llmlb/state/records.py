"""What llmlb did: the request history (one row per request), the hub's pull requests
(registrations) and the Hugging Face stats cache. The SQL only; ``history.py``, ``hub.py``
and ``hf_stats.py`` decide what the rows mean and when they are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine import Engine, Row
from .usage import UsageRollups

REQUEST_COLUMNS = ("at", "key_name", "operation", "model", "node", "status", "stream",
                   "latency_ms", "ttft_ms", "tokens_in", "tokens_out", "error")


class Requests:
    def __init__(self, engine: Engine, usage: UsageRollups) -> None:
        self.engine, self.usage = engine, usage

    def insert(self, rows: Sequence[Sequence[Any]],
               rollups: dict[int, Sequence[Sequence[Any]]] | None = None) -> None:
        """Rows in ``REQUEST_COLUMNS`` order, in one transaction (COPY on PostgreSQL: a
        tenth of the CPU of one INSERT per row, paid by every request), with their sums
        added to the usage roll-ups (per bucket span: ``usage.UsageRollups.add``) in the
        same transaction."""
        with self.engine.transaction() as tx:
            if rows:
                self.engine.copy_rows(tx, "requests", REQUEST_COLUMNS, rows)
            for span, sums in (rollups or {}).items():
                self.usage.add(tx, span, sums)

    def prune(self, before: float) -> None:
        self.engine.execute("DELETE FROM requests WHERE at < ?", (before,))

    def query(self, *, model: str | None = None, node: str | None = None,
              key_name: str | None = None, status: str | None = None,
              since: float | None = None, until: float | None = None, limit: int = 100,
              before_id: int | None = None) -> list[Row]:
        """Newest first. ``status``: one code ("429") or a class ("5xx", "error" = >= 400)."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("model", model), ("node", node), ("key_name", key_name)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if status:
            if status == "error":
                where.append("status >= 400")
            elif len(status) == 3 and status.endswith("xx") and status[0].isdigit():
                where.append("status / 100 = ?")
                args.append(int(status[0]))
            else:
                where.append("status = ?")
                args.append(int(status))
        for clause, value in (("at >= ?", since), ("at < ?", until), ("id < ?", before_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT * FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
        return self.engine.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()


class Registrations:
    """Pulls asked for through the hub: the model, and the node that runs it (None: this
    process)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def models(self) -> dict[str, str | None]:
        """Model id -> the remote node its pull was handed to (None: this process)."""
        return {r["model_id"]: r["node"]
                for r in self.engine.execute("SELECT model_id, node FROM registrations")}

    def local(self) -> list[str]:
        return [r["model_id"] for r in
                self.engine.execute("SELECT model_id FROM registrations WHERE node IS NULL")]

    def record(self, model_id: str, node: str | None, now: float) -> None:
        self.engine.execute(
            "INSERT INTO registrations (model_id, state, requested_at, updated_at, node) "
            "VALUES (?, 'registered', ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET "
            "updated_at = excluded.updated_at, node = excluded.node", (model_id, now, now, node))

    def forget(self, model_id: str) -> None:
        self.engine.execute("DELETE FROM registrations WHERE model_id = ?", (model_id,))


class HubStats:
    """Download and like counts per repository, with a claim so that one worker of the
    cluster fetches each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def all(self) -> dict[str, Row]:
        return {r["repo_id"]: r for r in self.engine.execute(
            "SELECT repo_id, downloads, likes, ok, fetched_at FROM hf_stats")}

    def claim(self, repo: str, now: float, fresh_for: float, failed_fresh_for: float,
              claim_seconds: float) -> bool:
        """Claim the refresh of ``repo`` unless its stats are fresh or another worker
        claimed it within ``claim_seconds``."""
        with self.engine.transaction() as tx:
            tx.lock(f"hf_stats:{repo}")
            row = tx.execute("SELECT ok, fetched_at, claimed_at FROM hf_stats WHERE "
                             "repo_id = ?", (repo,)).fetchone()
            if row is not None:
                fresh = now - row["fetched_at"] <= (fresh_for if row["ok"] else
                                                    failed_fresh_for)
                claimed = row["claimed_at"] and now - row["claimed_at"] < claim_seconds
                if fresh or claimed:
                    return False
                tx.execute("UPDATE hf_stats SET claimed_at = ? WHERE repo_id = ?", (now, repo))
            else:
                tx.execute("INSERT INTO hf_stats (repo_id, ok, fetched_at, claimed_at) "
                           "VALUES (?, 0, 0, ?)", (repo, now))
        return True

    def store(self, repo: str, downloads: int | None, likes: int | None, ok: bool,
              now: float) -> None:
        self.engine.execute("UPDATE hf_stats SET downloads = ?, likes = ?, ok = ?, "
                            "fetched_at = ?, claimed_at = NULL WHERE repo_id = ?",
                            (downloads, likes, int(ok), now, repo))

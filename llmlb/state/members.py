"""The balancer's members: nodes, external endpoints and hosted providers (the ``nodes``
table, one row per name), their reports, failures and cooldowns; and which member pulls a model nobody has yet
(``pulls``, one row per model across the cluster). The SQL only; what the rows mean, who may
take a name and how long a cooldown lasts are ``balancer/registry.py``'s.

A row that takes or frees a name serialises on that name's lock, so two balancers (or two
workers) registering one name at once never both find it free; it also tells every worker of
every balancer that members changed (topic ``MEMBERS``). Reports, written by each heartbeat,
announce nothing: readers keep them for half a second at most.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable

from .engine import Engine, Row

MEMBERS = "nodes"  # the change topic: a node, endpoint or provider added or removed
NODE, ENDPOINT, PROVIDER = "node", "endpoint", "provider"

#: called with a name's row (None: the name is free) before it is registered or heartbeats;
#: raises to refuse, which leaves everything as it was
Admit = Callable[[Row | None], None]


class Members:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def version(self) -> Hashable | None:
        """Changes to the members so far (``Engine.version``)."""
        return self.engine.version(MEMBERS)

    # --- reading ----------------------------------------------------------------------------

    def all(self) -> list[Row]:
        return self.engine.execute("SELECT * FROM nodes ORDER BY name").fetchall()

    def get(self, name: str) -> Row | None:
        return self.engine.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()

    def used(self, name: str) -> bool:
        return self.engine.execute("SELECT 1 AS one FROM nodes WHERE name = ?",
                                   (name,)).fetchone() is not None

    # --- names ------------------------------------------------------------------------------

    def register(self, name: str, url: str, secret: str, report: str, now: float,
                 admit: Admit) -> Row:
        """Add the node ``name``, or renew the row of that name (its URL and report; online,
        no failures, no cooldown) once ``admit`` accepts it."""
        with self.engine.transaction() as tx:
            tx.lock(f"node-name:{name}")
            admit(tx.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone())
            tx.execute(
                "INSERT INTO nodes (name, kind, url, secret, report, registered_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "url = excluded.url, report = excluded.report, "
                "registered_at = excluded.registered_at, last_seen = excluded.last_seen, "
                "failures = 0, cooldown_until = 0, last_error = NULL",
                (name, NODE, url, secret, report, now, now))
            row = tx.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
            tx.changed(MEMBERS)
        return row

    def add_endpoint(self, name: str, url: str, credential: str | None, report: str,
                     now: float) -> Row | None:
        """Add an external endpoint; None when the name is used already."""
        with self.engine.transaction() as tx:
            tx.lock(f"node-name:{name}")
            if tx.execute("SELECT 1 AS one FROM nodes WHERE name = ?", (name,)).fetchone():
                return None
            row = tx.execute(
                "INSERT INTO nodes (name, kind, url, credential, report, registered_at, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (name, ENDPOINT, url, credential, report, now, now)).fetchone()
            tx.changed(MEMBERS)
        return row

    def sync_providers(self, providers: dict[str, str], report: str, now: float, *,
                       forget_others: bool) -> list[Row]:
        """A row for each hosted provider in ``providers`` (name -> base URL) that lacks one,
        its URL brought up to date; with ``forget_others``, the rows of other providers go.
        Returns the rows of other kinds that hold one of these names."""
        taken = []
        with self.engine.transaction() as tx:
            tx.lock("providers")
            rows = {r["name"]: r for r in tx.execute("SELECT name, kind, url FROM nodes")
                    if r["kind"] == PROVIDER or r["name"] in providers}
            changed = False
            for name, row in rows.items():
                if forget_others and row["kind"] == PROVIDER and name not in providers:
                    tx.execute("DELETE FROM nodes WHERE name = ?", (name,))
                    changed = True
            for name, url in providers.items():
                row = rows.get(name)
                if row is None:
                    tx.execute("INSERT INTO nodes (name, kind, url, report, registered_at, "
                               "last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                               (name, PROVIDER, url, report, now, now))
                    changed = True
                elif row["kind"] != PROVIDER:
                    taken.append(row)
                elif row["url"] != url:
                    tx.execute("UPDATE nodes SET url = ? WHERE name = ?", (url, name))
            if changed:
                tx.changed(MEMBERS)
        return taken

    def remove(self, name: str) -> bool:
        """Forget the member (its pulls with it), which frees its name."""
        with self.engine.transaction() as tx:
            tx.lock(f"node-name:{name}")
            row = tx.execute("SELECT id FROM nodes WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            tx.execute("DELETE FROM nodes WHERE id = ?", (row["id"],))
            tx.execute("DELETE FROM pulls WHERE node_id = ?", (row["id"],))
            tx.changed(MEMBERS)
        return True

    # --- reports and failures ---------------------------------------------------------------

    def heartbeat(self, name: str, report: str, now: float, admit: Admit) -> bool:
        """Store a node's report once ``admit`` accepts its row; False when no node has the
        name."""
        with self.engine.transaction() as tx:
            row = tx.execute("SELECT * FROM nodes WHERE name = ? AND kind = ?",
                             (name, NODE)).fetchone()
            if row is None:
                return False
            admit(row)
            tx.execute("UPDATE nodes SET report = ?, last_seen = ? WHERE id = ?",
                       (report, now, row["id"]))
        return True

    def checked(self, member_id: int, report: str, now: float, error: str | None) -> None:
        """An endpoint's check: healthy (``error`` None) counts as a heartbeat."""
        if error is None:
            self.engine.execute("UPDATE nodes SET report = ?, last_seen = ? WHERE id = ?",
                                (report, now, member_id))
        else:
            self.engine.execute("UPDATE nodes SET report = ?, last_error = ? WHERE id = ?",
                                (report, error, member_id))

    def fail(self, member_id: int, now: float, reason: str,
             cooldown: Callable[[int], float]) -> float:
        """Count a failure: unless a cooldown runs already (another worker's failure counts),
        the member's failures in a row go up by one and it cools down for
        ``cooldown(failures)`` seconds. Returns the seconds its cooldown still lasts."""
        with self.engine.transaction() as tx:
            tx.lock(f"node:{member_id}")  # two workers' failures at once count once
            row = tx.execute("SELECT failures, cooldown_until FROM nodes WHERE id = ?",
                             (member_id,)).fetchone()
            if row is None:
                return 0.0
            if row["cooldown_until"] > now:
                failures, seconds = row["failures"], row["cooldown_until"] - now
            else:
                failures = row["failures"] + 1
                seconds = cooldown(failures)
            tx.execute("UPDATE nodes SET failures = ?, cooldown_until = ?, last_error = ? "
                       "WHERE id = ?", (failures, now + seconds, reason, member_id))
        return seconds

    def succeed(self, member_id: int, now: float) -> None:
        """An answer after failures: the next failure starts from the base cooldown."""
        self.engine.execute("UPDATE nodes SET failures = 0 WHERE id = ? AND failures > 0 AND "
                            "cooldown_until <= ?", (member_id, now))

    # --- one pull per model -----------------------------------------------------------------

    def assign_pull(self, model_id: str, member_id: int, valid: Collection[int],
                    now: float) -> int:
        """The member that pulls ``model_id``: the one assigned already while it is in
        ``valid``, else ``member_id``. The first to ask, of every worker of every balancer,
        wins; the others follow it."""
        with self.engine.transaction() as tx:
            tx.lock(f"pull:{model_id}")
            row = tx.execute("SELECT node_id FROM pulls WHERE model_id = ?",
                             (model_id,)).fetchone()
            if row is not None and row["node_id"] in valid:
                return row["node_id"]
            tx.execute("INSERT INTO pulls (model_id, node_id, assigned_at) VALUES (?, ?, ?) "
                       "ON CONFLICT (model_id) DO UPDATE SET node_id = excluded.node_id, "
                       "assigned_at = excluded.assigned_at", (model_id, member_id, now))
        return member_id

    def prune_pulls(self, done: Collection[tuple[int, str]], older_than: float) -> None:
        """Forget assignments that are ``done`` ((member id, model id): it has the model) or
        older than ``older_than``."""
        with self.engine.transaction() as tx:
            stale = [(row["model_id"],) for row in tx.execute("SELECT * FROM pulls")
                     if (row["node_id"], row["model_id"]) in done
                     or row["assigned_at"] < older_than]
            if stale:
                tx.executemany("DELETE FROM pulls WHERE model_id = ?", stale)

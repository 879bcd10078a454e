"""The balancer's node registry, in SQLite so that every gunicorn worker agrees (LB-1).

A node registers by name (the same name after a restart is the same node: same row, same id)
and then sends heartbeats carrying its report. Its status is derived when read, never stored:
``offline`` when the last heartbeat is older than ``LLMLB_NODE_TIMEOUT_SECONDS``, ``cooldown``
while a failure's cooldown runs, else ``online``. Cooldowns double with each failure in a row
up to a cap (or last a node's own Retry-After) and are shared by all workers through the table.

Each worker keeps the rows it read for ``CACHE_SECONDS`` (the staleness a routing decision may
have) and drops them at once when it writes a change itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ..db import Database

log = logging.getLogger(__name__)
CACHE_SECONDS = 0.5
ONLINE, OFFLINE, COOLDOWN = "online", "offline", "cooldown"
NODE, ENDPOINT, PROVIDER = "node", "endpoint", "provider"


@dataclass(frozen=True)
class NodeRecord:
    id: int
    name: str
    kind: str  # NODE | ENDPOINT | PROVIDER
    url: str
    secret: str | None
    report: dict
    registered_at: float
    last_seen: float
    failures: int
    cooldown_until: float
    last_error: str | None
    models: frozenset[str] = field(default=frozenset(), compare=False)
    credential: str | None = field(default=None, repr=False)

    def status(self, now: float, timeout: float) -> str:
        if self.kind == PROVIDER:  # a hosted API: down only while a failure cools it down
            return COOLDOWN if self.cooldown_until > now else ONLINE
        if self.kind == ENDPOINT:
            # Its health comes from the balancer's own checks (EndpointWatch); a check that
            # has not run for three rounds (no supervisor) counts as a failed one.
            if not self.report.get("healthy", True):
                return OFFLINE
            timeout = max(timeout, 3 * float(self.report.get("check_seconds") or 0))
        if now - self.last_seen > timeout:
            return OFFLINE
        if self.cooldown_until > now:
            return COOLDOWN
        return ONLINE


def _record(row) -> NodeRecord:  # noqa: ANN001 - a sqlite3.Row
    try:
        report = json.loads(row["report"])
    except ValueError:
        report = {}
    # Lower-cased like every model id a request names (an endpoint's own ids keep their case
    # in its listing).
    models = frozenset(m["id"].lower() for m in report.get("models", ()) if isinstance(m, dict)
                       and isinstance(m.get("id"), str))
    return NodeRecord(row["id"], row["name"], row["kind"], row["url"], row["secret"], report,
                      row["registered_at"], row["last_seen"], row["failures"],
                      row["cooldown_until"], row["last_error"], models, row["credential"])


class NameTaken(Exception):
    """A node tried to register under an endpoint's or a hosted provider's name."""


class NodeRegistry:
    def __init__(self, db: Database, *, timeout: float, cooldown: float,
                 cooldown_max: float) -> None:
        self.db = db
        self.timeout, self.cooldown, self.cooldown_max = timeout, cooldown, cooldown_max
        self._cache: tuple[float, tuple[NodeRecord, ...]] = (-1.0, ())
        self._cache_lock = threading.Lock()

    # --- reading ------------------------------------------------------------------------------

    def nodes(self, fresh: bool = False) -> tuple[NodeRecord, ...]:
        read_at, records = self._cache
        now = time.monotonic()
        if fresh or now - read_at > CACHE_SECONDS:
            with self._cache_lock:
                read_at, records = self._cache
                if fresh or now - read_at > CACHE_SECONDS:
                    rows = self.db.conn().execute("SELECT * FROM nodes ORDER BY name").fetchall()
                    records = tuple(_record(r) for r in rows)
                    self._cache = (time.monotonic(), records)
        return records

    def get(self, name: str) -> NodeRecord | None:
        row = self.db.conn().execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        return _record(row) if row else None

    def status(self, record: NodeRecord, now: float | None = None) -> str:
        return record.status(time.time() if now is None else now, self.timeout)

    # --- writing ------------------------------------------------------------------------------

    def register(self, name: str, url: str, report: dict, *, secret: str | None = None,
                 kind: str = "node") -> NodeRecord:
        """Add the node, or update the one of that name (a restart): it starts afresh, online
        and without cooldown."""
        now = time.time()
        with self.db.transaction() as conn:
            taken = conn.execute("SELECT kind FROM nodes WHERE name=?", (name,)).fetchone()
            if taken is not None and taken["kind"] in (ENDPOINT, PROVIDER):
                raise NameTaken(taken["kind"])
            conn.execute(
                "INSERT INTO nodes(name, kind, url, secret, report, registered_at, last_seen) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, "
                "url=excluded.url, secret=excluded.secret, report=excluded.report, "
                "registered_at=excluded.registered_at, last_seen=excluded.last_seen, "
                "failures=0, cooldown_until=0, last_error=NULL",
                (name, kind, url, secret, json.dumps(report), now, now))
            row = conn.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        self._invalidate()
        return _record(row)

    def add_endpoint(self, name: str, url: str, report: dict, credential: str | None,
                     ) -> NodeRecord | None:
        """Add an external endpoint; None when the name is taken (by a node or endpoint)."""
        now = time.time()
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM nodes WHERE name=?", (name,)).fetchone():
                return None
            conn.execute("INSERT INTO nodes(name, kind, url, credential, report, registered_at, "
                         "last_seen) VALUES (?,?,?,?,?,?,?)",
                         (name, ENDPOINT, url, credential, json.dumps(report), now, now))
            row = conn.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        self._invalidate()
        return _record(row)

    def sync_providers(self, providers: dict[str, str]) -> None:
        """The hosted providers this balancer has keys for (name -> base URL) as rows of their
        own, which carry their cooldowns, failures and model lists like any member's; the
        rows of providers no longer configured go. A name a node or endpoint holds stays
        theirs (logged)."""
        now = time.time()
        with self.db.transaction() as conn:
            rows = {r["name"]: r for r in conn.execute("SELECT name, kind, url FROM nodes")
                    if r["kind"] == PROVIDER or r["name"] in providers}
            for name, row in rows.items():
                if row["kind"] == PROVIDER and name not in providers:
                    conn.execute("DELETE FROM nodes WHERE name=?", (name,))
            for name, url in providers.items():
                row = rows.get(name)
                if row is None:
                    conn.execute("INSERT INTO nodes(name, kind, url, report, registered_at, "
                                 "last_seen) VALUES (?,?,?,?,?,?)",
                                 (name, PROVIDER, url, json.dumps({"models": []}), now, now))
                elif row["kind"] != PROVIDER:
                    log.warning("The %s %s holds the name %s: the hosted provider of that "
                                "name cannot be used until it is removed", row["kind"], name,
                                name)
                elif row["url"] != url:
                    conn.execute("UPDATE nodes SET url=? WHERE name=?", (url, name))
        self._invalidate()

    def checked(self, node_id: int, report: dict) -> None:
        """An endpoint's check result: a healthy one counts as a heartbeat."""
        with self.db.transaction() as conn:
            if report.get("healthy"):
                conn.execute("UPDATE nodes SET report=?, last_seen=? WHERE id=?",
                             (json.dumps(report), time.time(), node_id))
            else:
                conn.execute("UPDATE nodes SET report=?, last_error=? WHERE id=?",
                             (json.dumps(report), str(report.get("error"))[:500], node_id))
        self._invalidate()

    def heartbeat(self, name: str, report: dict) -> bool:
        """Store a node's report; False when the node is unknown (it should register)."""
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE nodes SET report=?, last_seen=? WHERE name=? "
                               "AND kind='node'",
                               (json.dumps(report), time.time(), name))
        self._invalidate()
        return cur.rowcount == 1

    def remove(self, name: str) -> bool:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT id FROM nodes WHERE name=?", (name,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM nodes WHERE id=?", (row["id"],))
            conn.execute("DELETE FROM pulls WHERE node_id=?", (row["id"],))
        self._invalidate()
        return True

    def record_failure(self, node_id: int, reason: str, retry_after: float | None = None,
                       ) -> float:
        """Put a node in cooldown; returns its length in seconds. A Retry-After the node sent
        is honoured (up to the cap); otherwise the cooldown doubles with each failure in a
        row."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT failures, cooldown_until FROM nodes WHERE id=?",
                               (node_id,)).fetchone()
            if row is None:
                return 0.0
            if row["cooldown_until"] > now:  # another worker's failure already counts
                seconds = row["cooldown_until"] - now
                failures = row["failures"]
            else:
                failures = row["failures"] + 1
                seconds = (retry_after if retry_after is not None
                           else self.cooldown * 2 ** min(failures - 1, 30))
                seconds = min(seconds, self.cooldown_max)
            conn.execute("UPDATE nodes SET failures=?, cooldown_until=?, last_error=? "
                         "WHERE id=?", (failures, now + seconds, reason[:500], node_id))
        self._invalidate()
        return seconds

    def record_success(self, node_id: int) -> None:
        """A node answered after failures: the next failure starts from the base cooldown."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE nodes SET failures=0 WHERE id=? AND failures>0 "
                         "AND cooldown_until<=?", (node_id, time.time()))
        self._invalidate()

    # --- one pull per model across the cluster ------------------------------------------------

    def assign_pull(self, model_id: str, node_id: int, valid: set[int]) -> int:
        """The node that pulls ``model_id``: the one already assigned while it is in
        ``valid``, else ``node_id``. The first worker to ask wins; the others follow it."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT node_id FROM pulls WHERE model_id=?",
                               (model_id,)).fetchone()
            if row is not None and row["node_id"] in valid:
                return row["node_id"]
            conn.execute("INSERT INTO pulls(model_id, node_id, assigned_at) VALUES (?,?,?) "
                         "ON CONFLICT(model_id) DO UPDATE SET node_id=excluded.node_id, "
                         "assigned_at=excluded.assigned_at", (model_id, node_id, time.time()))
        return node_id

    def prune_pulls(self, older_than: float) -> None:
        """Forget assignments that are done (the node has the model) or stale."""
        ready = {(r.id, m) for r in self.nodes(fresh=True) for m in r.models}
        with self.db.transaction() as conn:
            for row in conn.execute("SELECT * FROM pulls").fetchall():
                if (row["node_id"], row["model_id"]) in ready or row["assigned_at"] < older_than:
                    conn.execute("DELETE FROM pulls WHERE model_id=?", (row["model_id"],))

    def _invalidate(self) -> None:
        self._cache = (-1.0, ())


class StatusWatch:
    """The supervisor's ``node-watch`` task: logs each node's status changes (the status
    itself is derived at read, so nothing depends on this running on time) and forgets pull
    assignments that are done or stale."""

    def __init__(self, registry: NodeRegistry, forget_pulls_after: float) -> None:
        self.registry, self.forget_pulls_after = registry, forget_pulls_after
        self._seen: dict[str, str] = {}
        self._pruned = 0.0

    def __call__(self) -> None:
        now = time.time()
        for record in self.registry.nodes(fresh=True):
            status = record.status(now, self.registry.timeout)
            before = self._seen.get(record.name)
            if before is not None and before != status:
                why = {OFFLINE: record.last_error or "failed check" if record.kind == ENDPOINT
                       else f"no heartbeat for {now - record.last_seen:.0f}s",
                       COOLDOWN: record.last_error or "a failure",
                       ONLINE: "its cooldown is over" if before == COOLDOWN
                       else "it sends heartbeats again"}[status]
                log.log(logging.WARNING if status != ONLINE else logging.INFO,
                        "Node %s is %s (%s)", record.name,
                        "in cooldown" if status == COOLDOWN else status, why)
            self._seen[record.name] = status
        if now - self._pruned > 10:
            self.registry.prune_pulls(now - self.forget_pulls_after)
            self._pruned = now


def registration(body: dict) -> tuple[str, str, str | None, dict]:
    """(name, url, secret, report) from a node's registration, or a 400 naming the field."""
    from urllib.parse import urlsplit

    from .. import errors
    from ..config import NODE_NAME

    name, url, secret = body.get("name"), body.get("url"), body.get("secret")
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise errors.invalid_request("Invalid value for 'name': 1-64 letters, digits, '.', '_' "
                                     "or '-', starting with a letter or digit", "name")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") \
            or not urlsplit(url).hostname:
        raise errors.invalid_request("Invalid value for 'url': the node's http(s) address",
                                     "url")
    if secret is not None and (not isinstance(secret, str) or not 16 <= len(secret) <= 200):
        raise errors.invalid_request("Invalid value for 'secret': 16 to 200 characters",
                                     "secret")
    return name, url.rstrip("/"), secret, report_of(body)


def report_of(body: dict) -> dict:
    report = body.get("report", {})
    if not isinstance(report, dict):
        from .. import errors

        raise errors.invalid_request("Invalid value for 'report': a JSON object", "report")
    return report

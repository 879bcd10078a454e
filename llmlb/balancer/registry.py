"""The balancer's node registry, in SQLite so that every gunicorn worker agrees (LB-1).

A node registers by name (the same name after a restart is the same node: same row, same id)
and then sends heartbeats carrying its report. A name belongs to the node that first
registered it (SC-7): every node holds a secret of its own, kept in its home, and hands it
over at registration; a registration or heartbeat under a taken name must bring that same
secret, or it is refused (``NameTaken``), whoever holds the shared node key. Forgetting the
node (an admin) frees the name. ``local``, the in-process node's name, is never a member's.

Its status is derived when read, never stored: ``offline`` when the last heartbeat is older
than ``LLMLB_NODE_TIMEOUT_SECONDS`` (or its row cannot be used: a URL or report stored before
they were checked), ``cooldown`` while a failure's cooldown runs, else ``online``. Cooldowns
double with each failure in a row up to a cap (or last a node's own Retry-After) and are
shared by all workers through the table.

External endpoints (``endpoints.py``) and hosted providers (``providers.py``) are rows too:
their cooldowns and failures work as a node's, their reports are the balancer's own checks;
a provider is ``online`` unless it cools down.

Each worker keeps the rows it read for ``CACHE_SECONDS`` (the staleness a routing decision may
have) and drops them at once when it writes a change itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ..auth import same_secret
from ..db import Database
from ..urls import BadURL, check_url
from .reports import EndpointReport, NodeReport, Report, ReportError

log = logging.getLogger(__name__)
CACHE_SECONDS = 0.5
ONLINE, OFFLINE, COOLDOWN = "online", "offline", "cooldown"
NODE, ENDPOINT, PROVIDER = "node", "endpoint", "provider"
LOCAL_NAME = "local"  # the in-process node's name (X-LLMLB-Node: local): never a member's


@dataclass(frozen=True)
class NodeRecord:
    id: int
    name: str
    kind: str  # NODE | ENDPOINT | PROVIDER
    url: str
    secret: str | None = field(repr=False)
    report: Report
    registered_at: float
    last_seen: float
    failures: int
    cooldown_until: float
    last_error: str | None
    models: frozenset[str] = field(default=frozenset(), compare=False)
    credential: str | None = field(default=None, repr=False)
    # Why the row cannot be used (its URL or report was stored before they were checked):
    # it is listed offline with this as its error, gets no traffic, and can be forgotten.
    unusable: str | None = None

    def status(self, now: float, timeout: float) -> str:
        if self.unusable is not None:
            return OFFLINE
        if self.kind == PROVIDER:  # a hosted API: down only while a failure cools it down
            return COOLDOWN if self.cooldown_until > now else ONLINE
        if isinstance(self.report, EndpointReport):
            # Its health comes from the balancer's own checks (EndpointWatch); a check that
            # has not run for three rounds (no supervisor) counts as a failed one.
            if not self.report.healthy:
                return OFFLINE
            timeout = max(timeout, 3 * self.report.check_seconds)
        if now - self.last_seen > timeout:
            return OFFLINE
        if self.cooldown_until > now:
            return COOLDOWN
        return ONLINE


Parsed = tuple[Report, frozenset[str], str | None]  # report, model ids, why unusable


def _parse_row(row) -> Parsed:  # noqa: ANN001 - a sqlite3.Row
    """A row's URL and report checked again as they are read (a row an older llmlb wrote
    may hold anything): a row that fails is unusable, never an exception for its reader."""
    checked = row["kind"] in (ENDPOINT, PROVIDER)  # by the balancer: an endpoint's report
    report: Report = EndpointReport(healthy=False) if checked else NodeReport()
    unusable = None
    try:
        check_url(row["url"])
        raw = json.loads(row["report"])
        report = EndpointReport.parse(raw) if checked else NodeReport.parse(raw)
    except BadURL as exc:
        unusable = f"its stored URL {exc}; forget it (DELETE /v0/nodes/{row['name']})"
    except (ValueError, ReportError) as exc:
        unusable = f"its stored report is malformed ({exc}); it is replaced by the next good one"
    # Lower-cased like every model id a request names (an endpoint's own ids keep their case
    # in its listing).
    return report, frozenset(m.id.lower() for m in report.models), unusable


def _record(row, parsed: Parsed) -> NodeRecord:  # noqa: ANN001 - a sqlite3.Row
    report, models, unusable = parsed
    return NodeRecord(row["id"], row["name"],
                      row["kind"] if row["kind"] in (ENDPOINT, PROVIDER) else NODE,
                      row["url"], row["secret"], report, row["registered_at"], row["last_seen"],
                      row["failures"], row["cooldown_until"], row["last_error"], models,
                      row["credential"], unusable)


class NameTaken(Exception):
    """A name a member may not have; ``taken_by`` says by what (for the log), ``why`` also
    what to do (for the error message)."""

    def __init__(self, name: str, taken_by: str, advice: str) -> None:
        super().__init__(f"{name} {taken_by}")
        self.name, self.taken_by, self.why = name, taken_by, f"{taken_by}; {advice}"


def owned_elsewhere(name: str) -> NameTaken:
    return NameTaken(
        name, "belongs to another node (registered by a node holding a different secret; each "
        "node keeps its own in its LLMLB_HOME)",
        f"start this node with another --name, or, if this is that node and its home was "
        f"lost, forget the old node first (DELETE /v0/nodes/{name}, or Forget on the "
        f"dashboard's Nodes page) and it registers anew")


def reserved(name: str) -> NameTaken | None:
    if name.lower() == LOCAL_NAME:
        return NameTaken(name, "is the name of the balancer's in-process node",
                         "choose another")
    return None


class NodeRegistry:
    def __init__(self, db: Database, *, timeout: float, cooldown: float,
                 cooldown_max: float) -> None:
        self.db = db
        self.timeout, self.cooldown, self.cooldown_max = timeout, cooldown, cooldown_max
        self._cache: tuple[float, tuple[NodeRecord, ...]] = (-1.0, ())
        self._cache_lock = threading.Lock()
        # Reports parsed, by row id, while their text is the same: parsing a 50-model report
        # costs ~1 ms, and the rows are read twice a second per worker, reports change at most
        # once a heartbeat.
        self._parsed: dict[int, tuple[tuple[str, str, str], Parsed]] = {}

    # --- reading ------------------------------------------------------------------------------

    def nodes(self, fresh: bool = False) -> tuple[NodeRecord, ...]:
        read_at, records = self._cache
        now = time.monotonic()
        if fresh or now - read_at > CACHE_SECONDS:
            with self._cache_lock:
                read_at, records = self._cache
                if fresh or now - read_at > CACHE_SECONDS:
                    rows = self.db.conn().execute("SELECT * FROM nodes ORDER BY name").fetchall()
                    records = tuple(self._record(r) for r in rows)
                    for gone in self._parsed.keys() - {r.id for r in records}:
                        self._parsed.pop(gone, None)
                    self._cache = (time.monotonic(), records)
        return records

    def get(self, name: str) -> NodeRecord | None:
        row = self.db.conn().execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        return self._record(row) if row else None

    def _record(self, row) -> NodeRecord:  # noqa: ANN001 - a sqlite3.Row
        identity = (row["kind"], row["url"], row["report"])
        known = self._parsed.get(row["id"])
        if known is None or known[0] != identity:
            known = self._parsed[row["id"]] = (identity, _parse_row(row))
        return _record(row, known[1])

    def status(self, record: NodeRecord, now: float | None = None) -> str:
        return record.status(time.time() if now is None else now, self.timeout)

    # --- writing ------------------------------------------------------------------------------

    def register(self, name: str, url: str, report: NodeReport, *, secret: str,
                 ) -> NodeRecord:
        """Add the node, or update the one of that name when ``secret`` proves it is the
        same node (a restart): it starts afresh, online and without cooldown. Raises
        NameTaken for a name that is not this node's."""
        taken = reserved(name)
        if taken is not None:
            raise taken
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT kind, secret FROM nodes WHERE name=?", (name,)).fetchone()
            if row is not None and row["kind"] in (ENDPOINT, PROVIDER):
                raise NameTaken(name, "belongs to an external endpoint" if row["kind"] ==
                                ENDPOINT else "belongs to a hosted provider",
                                "start the node with another --name")
            if row is not None and not same_secret(secret, row["secret"] or ""):
                raise owned_elsewhere(name)
            conn.execute(
                "INSERT INTO nodes(name, kind, url, secret, report, registered_at, last_seen) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "url=excluded.url, report=excluded.report, "
                "registered_at=excluded.registered_at, last_seen=excluded.last_seen, "
                "failures=0, cooldown_until=0, last_error=NULL",
                (name, NODE, url, secret, _dumps(report), now, now))
            row = conn.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        self._invalidate()
        return self._record(row)

    def add_endpoint(self, name: str, url: str, report: EndpointReport,
                     credential: str | None) -> NodeRecord:
        """Add an external endpoint; raises NameTaken when the name is taken."""
        self.check_free(name)
        now = time.time()
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM nodes WHERE name=?", (name,)).fetchone():
                raise _used(name)
            conn.execute("INSERT INTO nodes(name, kind, url, credential, report, registered_at, "
                         "last_seen) VALUES (?,?,?,?,?,?,?)",
                         (name, ENDPOINT, url, credential, _dumps(report), now, now))
            row = conn.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        self._invalidate()
        return self._record(row)

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
                                 (name, PROVIDER, url, _dumps(EndpointReport(healthy=True)),
                                  now, now))
                elif row["kind"] != PROVIDER:
                    log.warning("The %s %s holds the name %s: the hosted provider of that "
                                "name cannot be used until it is removed", row["kind"], name,
                                name)
                elif row["url"] != url:
                    conn.execute("UPDATE nodes SET url=? WHERE name=?", (url, name))
        self._invalidate()

    def check_free(self, name: str) -> None:
        """Raises NameTaken unless an endpoint may take ``name`` now (checked again when it
        is stored)."""
        taken = reserved(name)
        if taken is not None:
            raise taken
        if self.db.conn().execute("SELECT 1 FROM nodes WHERE name=?", (name,)).fetchone():
            raise _used(name)

    def checked(self, node_id: int, report: EndpointReport) -> None:
        """An endpoint's (or a provider's) check result: a healthy one counts as a heartbeat."""
        with self.db.transaction() as conn:
            if report.healthy:
                conn.execute("UPDATE nodes SET report=?, last_seen=? WHERE id=?",
                             (_dumps(report), time.time(), node_id))
            else:
                conn.execute("UPDATE nodes SET report=?, last_error=? WHERE id=?",
                             (_dumps(report), (report.error or "failed check")[:500], node_id))
        self._invalidate()

    def heartbeat(self, name: str, secret: str, report: NodeReport) -> bool:
        """Store a node's report; False when the node is unknown (it should register).
        Raises NameTaken when ``secret`` is not the one the node registered with."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT id, secret FROM nodes WHERE name=? AND kind=?",
                               (name, NODE)).fetchone()
            if row is None:
                return False
            if not same_secret(secret, row["secret"] or ""):
                raise owned_elsewhere(name)
            conn.execute("UPDATE nodes SET report=?, last_seen=? WHERE id=?",
                         (_dumps(report), time.time(), row["id"]))
        self._invalidate()
        return True

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
                why = {OFFLINE: record.unusable or (
                           record.last_error or "failed check" if record.kind == ENDPOINT
                           else f"no heartbeat for {now - record.last_seen:.0f}s"),
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


def _dumps(report: Report) -> str:
    return json.dumps(report.to_json(), separators=(",", ":"))


def _used(name: str) -> NameTaken:
    return NameTaken(name, "is already used by a node or endpoint",
                     "remove it first or choose another")

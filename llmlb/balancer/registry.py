"""The balancer's node registry, in the shared state so that every worker of every balancer
agrees (LB-1, HA-2); its SQL is ``state/members.py``'s.

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
have: reports, cooldowns), drops them at once when it writes a change itself, and when any
worker of any balancer adds or removes a member (the state's ``MEMBERS`` topic).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ..auth import same_secret
from ..state import State
from ..state.members import ENDPOINT, NODE, PROVIDER, Row
from ..urls import BadURL, check_url
from .reports import EndpointReport, NodeReport, Report, ReportError

log = logging.getLogger(__name__)
CACHE_SECONDS = 0.5
ONLINE, OFFLINE, COOLDOWN = "online", "offline", "cooldown"
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


def _parse_row(row: Row) -> Parsed:
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


def _record(row: Row, parsed: Parsed) -> NodeRecord:
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
    def __init__(self, db: State, *, timeout: float, cooldown: float,
                 cooldown_max: float) -> None:
        self.db, self.members = db, db.members
        self.timeout, self.cooldown, self.cooldown_max = timeout, cooldown, cooldown_max
        # (when read, the records, the members' version then)
        self._cache: tuple[float, tuple[NodeRecord, ...], object] = (-1.0, (), None)
        self._cache_lock = threading.Lock()
        # Reports parsed, by row id, while their text is the same: parsing a 50-model report
        # costs ~1 ms, and the rows are read twice a second per worker, reports change at most
        # once a heartbeat.
        self._parsed: dict[int, tuple[tuple[str, str, str], Parsed]] = {}

    # --- reading ------------------------------------------------------------------------------

    def nodes(self, fresh: bool = False) -> tuple[NodeRecord, ...]:
        read_at, records, seen = self._cache
        now = time.monotonic()
        version = self.members.version()
        if fresh or now - read_at > CACHE_SECONDS or version != seen:
            with self._cache_lock:
                read_at, records, seen = self._cache
                if fresh or now - read_at > CACHE_SECONDS or version != seen:
                    records = tuple(self._record(r) for r in self.members.all())
                    for gone in self._parsed.keys() - {r.id for r in records}:
                        self._parsed.pop(gone, None)
                    self._cache = (time.monotonic(), records, version)
        return records

    def get(self, name: str) -> NodeRecord | None:
        row = self.members.get(name)
        return self._record(row) if row else None

    def _record(self, row: Row) -> NodeRecord:
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

        def admit(row: Row | None) -> None:
            if row is not None and row["kind"] in (ENDPOINT, PROVIDER):
                raise NameTaken(name, "belongs to an external endpoint" if row["kind"] ==
                                ENDPOINT else "belongs to a hosted provider",
                                "start the node with another --name")
            if row is not None and not same_secret(secret, row["secret"] or ""):
                raise owned_elsewhere(name)

        row = self.members.register(name, url, secret, _dumps(report), time.time(), admit)
        self._invalidate()
        return self._record(row)

    def add_endpoint(self, name: str, url: str, report: EndpointReport,
                     credential: str | None) -> NodeRecord:
        """Add an external endpoint; raises NameTaken when the name is taken."""
        self.check_free(name)
        row = self.members.add_endpoint(name, url, credential, _dumps(report), time.time())
        if row is None:
            raise _used(name)
        self._invalidate()
        return self._record(row)

    def sync_providers(self, providers: dict[str, str]) -> None:
        """The hosted providers this balancer has keys for (name -> base URL) as rows of their
        own, which carry their cooldowns, failures and model lists like any member's. On a
        state of its own, the rows of providers no longer configured go; on a shared one they
        stay (another balancer may hold their keys; this one skips them when routing). A name
        a node or endpoint holds stays theirs (logged)."""
        taken = self.members.sync_providers(providers, _dumps(EndpointReport(healthy=True)),
                                            time.time(), forget_others=not self.db.shared)
        for row in taken:
            log.warning("The %s %s holds the name %s: the hosted provider of that name cannot "
                        "be used until it is removed", row["kind"], row["name"], row["name"])
        self._invalidate()

    def check_free(self, name: str) -> None:
        """Raises NameTaken unless an endpoint may take ``name`` now (checked again when it
        is stored)."""
        taken = reserved(name)
        if taken is not None:
            raise taken
        if self.members.used(name):
            raise _used(name)

    def checked(self, node_id: int, report: EndpointReport) -> None:
        """An endpoint's (or a provider's) check result: a healthy one counts as a heartbeat."""
        self.members.checked(node_id, _dumps(report), time.time(),
                             None if report.healthy else (report.error or "failed check")[:500])
        self._invalidate()

    def heartbeat(self, name: str, secret: str, report: NodeReport) -> bool:
        """Store a node's report; False when the node is unknown (it should register).
        Raises NameTaken when ``secret`` is not the one the node registered with."""

        def admit(row: Row | None) -> None:
            if row is not None and not same_secret(secret, row["secret"] or ""):
                raise owned_elsewhere(name)

        known = self.members.heartbeat(name, _dumps(report), time.time(), admit)
        if known:
            self._invalidate()
        return known

    def remove(self, name: str) -> bool:
        removed = self.members.remove(name)
        self._invalidate()
        return removed

    def record_failure(self, node_id: int, reason: str, retry_after: float | None = None,
                       ) -> float:
        """Put a node in cooldown; returns its length in seconds. A Retry-After the node sent
        is honoured (up to the cap); otherwise the cooldown doubles with each failure in a
        row."""

        def cooldown(failures: int) -> float:
            seconds = (retry_after if retry_after is not None
                       else self.cooldown * 2 ** min(failures - 1, 30))
            return min(seconds, self.cooldown_max)

        seconds = self.members.fail(node_id, time.time(), reason[:500], cooldown)
        self._invalidate()
        return seconds

    def record_success(self, node_id: int) -> None:
        """A node answered after failures: the next failure starts from the base cooldown."""
        self.members.succeed(node_id, time.time())
        self._invalidate()

    # --- one pull per model across the cluster ------------------------------------------------

    def assign_pull(self, model_id: str, node_id: int, valid: set[int]) -> int:
        """The node that pulls ``model_id``: the one already assigned while it is in
        ``valid``, else ``node_id``. The first worker to ask wins; the others follow it."""
        return self.members.assign_pull(model_id, node_id, valid, time.time())

    def prune_pulls(self, older_than: float) -> None:
        """Forget assignments that are done (the node has the model) or stale."""
        ready = {(r.id, m) for r in self.nodes(fresh=True) for m in r.models}
        self.members.prune_pulls(ready, older_than)

    def _invalidate(self) -> None:
        self._cache = (-1.0, (), None)


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

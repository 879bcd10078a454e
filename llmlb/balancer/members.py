"""The nodes a balancer routes to right now: the in-process node (standalone, a node's own
balancer side) and the registered ones, each seen through one interface (``Member``) whatever
its kind.

A remote member is a registry row plus the client that reaches it; clients (and their
connection pools) live as long as the worker and are rebuilt when a node's URL or secret
changes. What the members report (models, downloads, memory, queue) is what the node said in
its last heartbeat, typed (``reports``); what the balancer counts itself (requests in flight)
comes from shared memory. The in-process member is the node package's (``node/member.py``),
handed in by the role's builder; the balancer knows it by ``in_process``, nothing else.

One member that cannot be used (a row stored before URLs and reports were checked, a client
that cannot be built) is left out of routing and listed as offline with its error: it never
breaks the listings, the routing or ``/v0/nodes`` for the others (SC-8).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..config import ClusterSettings
from .credentials import CredentialError, EnvAllowlist, describe, open_credential
from .http1 import HTTPClientError
from .inflight import InflightCounters
from .providers import Providers
from .registry import COOLDOWN, ENDPOINT, OFFLINE, ONLINE, PROVIDER, NodeRecord, NodeRegistry
from .reports import Download, EndpointReport, ModelEntry, NodeReport, Report, model_ids
from .upstream import Node, NodeUnreachable, ProxyRequest, RemoteNode

log = logging.getLogger(__name__)
DOWNLOADING_STATES = ("queued", "downloading")


class Member(Protocol):
    """A node or endpoint the balancer can hand requests to."""

    id: int  # its slot in the in-flight counters
    name: str
    kind: str  # NODE | ENDPOINT
    url: str | None
    status: str
    in_process: bool  # the node in this process: no network, so no cooldown
    node: Node  # how requests reach it

    def ready(self, model_id: str, request: ProxyRequest | None = None) -> bool:
        """Whether it has the model ready to serve (``request``: the one being routed)."""
        ...

    def models(self) -> tuple[ModelEntry, ...]: ...

    def queued(self) -> int:
        """Requests waiting there that the balancer does not count itself."""
        ...

    def free_memory(self) -> int: ...

    def pulling(self, model_id: str) -> bool: ...

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool: ...

    def report(self) -> Report: ...


class RemoteMember:
    """A registered node or endpoint, as its last report described it."""

    in_process = False

    def __init__(self, record: NodeRecord, node: RemoteNode, status: str) -> None:
        self.record, self.node, self.status = record, node, status
        self.id, self.name, self.kind, self.url = record.id, record.name, record.kind, record.url

    def ready(self, model_id: str, request: ProxyRequest | None = None) -> bool:
        return model_id in self.record.models

    def models(self) -> tuple[ModelEntry, ...]:
        return self.record.report.models

    def queued(self) -> int:
        return self.record.report.queued_requests

    def free_memory(self) -> int:
        report = self.record.report
        if isinstance(report, NodeReport) and report.hardware is not None:
            return report.hardware.memory().free_bytes
        return 0

    def downloads(self) -> tuple[Download, ...]:
        report = self.record.report
        return report.downloads if isinstance(report, NodeReport) else ()

    def pulling(self, model_id: str) -> bool:
        return any(d.model_id == model_id and d.status in DOWNLOADING_STATES
                   for d in self.downloads())

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        """Whether it can get the model: from its allowed sources (the catalog's), or from
        this balancer's copy (LB-4)."""
        report = self.record.report
        return balancer_has_it or (isinstance(report, NodeReport) and report.can_download)

    def report(self) -> Report:
        return self.record.report


class ProviderMember(RemoteMember):
    """A hosted provider (``providers.py``): ready for every model name with its prefix,
    listed or not; it holds no files and fetches none."""

    def __init__(self, record: NodeRecord, node: Node, status: str) -> None:
        self.record, self.node, self.status = record, node, status  # type: ignore[assignment]
        self.id, self.name, self.kind, self.url = record.id, record.name, record.kind, record.url
        self._prefix = record.name + ":"

    def ready(self, model_id: str, request: ProxyRequest | None = None) -> bool:
        return model_id.startswith(self._prefix)

    def queued(self) -> int:
        return 0

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        return False


class Cluster:
    def __init__(self, settings: ClusterSettings, registry: NodeRegistry | None,
                 inflight: InflightCounters, local: Member | None, *, home: Path,
                 pool_size: int, providers: Providers | None = None) -> None:
        self.settings, self.registry, self.inflight, self.local = (
            settings, registry, inflight, local)
        self.providers = providers  # the hosted providers this balancer has keys for
        self.home, self.pool_size = home, pool_size  # endpoint keys; connections per member
        self.env_allowlist = EnvAllowlist(settings.endpoint_env_allowlist)
        self._clients: dict[int, tuple[tuple[str, str | None, str | None], RemoteNode]] = {}
        self._clients_lock = threading.Lock()
        self._unbuildable: set[tuple[int, str]] = set()  # logged once each
        # per set of statuses asked for: (the registry's rows then, the members they made)
        self._members: dict[tuple[str, ...], tuple[tuple[NodeRecord, ...], list[Member]]] = {}

    def members(self, statuses: tuple[str, ...] = (ONLINE,)) -> list[Member]:
        """The members whose status is one of ``statuses``, the in-process one first; a row
        that cannot be used is never among them."""
        found: list[Member] = [self.local] if self.local is not None else []
        if self.registry is not None:
            records = self.registry.nodes()
            kept = self._members.get(statuses)
            if kept is not None and kept[0] is records:
                # The same rows as the last look (the registry reads them anew every
                # CACHE_SECONDS, or when they change): the same members. A status that turns
                # with the clock alone (a missed heartbeat, a cooldown's end) is seen at the
                # next read, as a change of the rows is.
                return found + kept[1]
            now = time.time()
            remote = []
            for record in records:
                status = record.status(now, self.registry.timeout)
                if status in statuses and record.unusable is None:
                    member = self._member(record, status)
                    if member is not None:
                        remote.append(member)
            self._members[statuses] = (records, remote)
            found += remote
        return found

    def _member(self, record: NodeRecord, status: str) -> RemoteMember | None:
        if record.kind == PROVIDER:
            # Its URL and key are this process's own settings, never the row's.
            node = self.providers.node(record.name) if self.providers is not None else None
            return ProviderMember(record, node, status) if node is not None else None
        client = self._client_or_none(record)
        return RemoteMember(record, client, status) if client is not None else None

    def _client_or_none(self, record: NodeRecord) -> RemoteNode | None:
        try:
            return self.client(record)
        except Exception as exc:  # noqa: BLE001 - one member must not fail the others
            if (record.id, record.url) not in self._unbuildable:
                self._unbuildable.add((record.id, record.url))
                log.warning("Node %s left out: no client for %s (%s)", record.name,
                            record.url, exc)
            return None

    def client(self, record: NodeRecord) -> RemoteNode:
        identity = (record.url, record.secret, record.credential)
        known = self._clients.get(record.id)
        if known is not None and known[0] == identity:
            return known[1]
        with self._clients_lock:
            known = self._clients.get(record.id)
            if known is None or known[0] != identity:
                if known is not None:
                    known[1].close()
                client = RemoteNode(record.name, record.url, self._bearer(record),
                                    endpoint=record.kind == ENDPOINT,
                                    pool_size=self.pool_size,
                                    connect_timeout=self.settings.proxy_connect_timeout_seconds,
                                    read_timeout=self.settings.proxy_read_timeout_seconds)
                self._clients[record.id] = (identity, client)
            return self._clients[record.id][1]

    def _bearer(self, record: NodeRecord) -> str | None:
        """A node's secret; an endpoint's API key, opened (never kept in the row in clear)."""
        if record.kind != ENDPOINT:
            return record.secret
        try:
            return open_credential(self.home, record.credential, self.env_allowlist)
        except CredentialError as exc:  # its requests get a 401 and it cools down: say why
            log.warning("Endpoint %s: no API key to send: %s", record.name, exc)
            return None

    def endpoint_model(self, model: str) -> bool:
        """Whether an endpoint lists this model id (which may not be a valid llmlb id), or it
        is a configured hosted provider's (``openai:gpt-4o``; another provider's is a 404
        naming the key to set)."""
        lowered = model.lower()
        if self.registry is not None and any(
                r.kind == ENDPOINT and lowered in r.models for r in self.registry.nodes()):
            return True
        return self.providers is not None and self.providers.check(model)

    def load(self, member: Member) -> int:
        return self.inflight.load(member.id) + member.queued()

    # --- views: listings, the node list ---------------------------------------------------

    def list_models(self) -> list[tuple[ModelEntry, list[str]]]:
        """Each model ready on a node that is up (online or cooling down), with the nodes."""
        by_id: dict[str, tuple[ModelEntry, list[str]]] = {}
        for member in self.members((ONLINE, COOLDOWN)):
            for entry in member.models():
                by_id.setdefault(entry.id, (entry, []))[1].append(member.name)
        return [by_id[k] for k in sorted(by_id)]

    def locate(self, model_id: str) -> tuple[ModelEntry, list[str]] | None:
        found = [(m, m.name) for m in self.members((ONLINE, COOLDOWN)) if m.ready(model_id)]
        if not found:
            return None
        first = found[0][0]
        entry = next((e for e in first.models() if e.id == model_id), ModelEntry(model_id))
        return entry, [name for _, name in found]

    def downloads(self) -> dict[str, list[tuple[str, Download]]]:
        """Downloads the remote nodes that are up report, by model id."""
        out: dict[str, list[tuple[str, Download]]] = {}
        for member in self.members((ONLINE, COOLDOWN)):
            if isinstance(member, RemoteMember):
                for d in member.downloads():
                    out.setdefault(d.model_id, []).append((member.name, d))
        return out

    def describe(self) -> list[dict]:
        """``GET /v0/nodes``: every node with its status, report and load. A member whose row
        cannot be read is listed as offline with its error, so that it can be forgotten."""
        now = time.time()
        rows = []
        if self.local is not None:
            try:
                report = self.local.report()
            except Exception:  # noqa: BLE001 - the list must still show every node
                log.exception("This node's report cannot be made")
                report = NodeReport()
            rows.append(_row(self.local.id, self.local.name, "node", None, ONLINE, report, now,
                             now, self.inflight.load(self.local.id)))
        for record in (self.registry.nodes(fresh=True) if self.registry else ()):
            if record.kind == PROVIDER and (self.providers is None
                                            or self.providers.node(record.name) is None):
                continue  # another balancer's provider, which this one has no key for
            try:
                rows.append(self._remote_row(record, now))
            except Exception as exc:  # noqa: BLE001 - the admin must see it to forget it
                log.exception("Node %s cannot be described", record.name)
                rows.append({**_row(record.id, record.name, record.kind, record.url, OFFLINE,
                                    NodeReport(), now, record.last_seen, 0),
                             "last_error": f"cannot be described: {type(exc).__name__}"})
        return rows

    def _remote_row(self, record: NodeRecord, now: float) -> dict:
        assert self.registry is not None
        status = record.status(now, self.registry.timeout)
        row = _row(record.id, record.name, record.kind, record.url, status, record.report, now,
                   record.last_seen, self.inflight.load(record.id))
        row.update({"registered_at": record.registered_at, "failures": record.failures,
                    "cooldown_until": record.cooldown_until if status == COOLDOWN else None,
                    "last_error": record.unusable or record.last_error})
        report = record.report
        if record.kind == PROVIDER and isinstance(report, EndpointReport):
            node = self.providers.node(record.name)  # type: ignore[union-attr]
            row.update(has_api_key=True, api_key_env=node.spec.key_variable,  # type: ignore[union-attr]
                       last_check_error=record.unusable or report.error)
        elif isinstance(report, EndpointReport):
            row.update(describe(record.credential), load_source=report.load_source,
                       endpoint_running=report.endpoint_running,
                       endpoint_waiting=report.endpoint_waiting,
                       last_check_error=record.unusable or report.error)
        return row

    # --- the node's internal API (pull, delete) ------------------------------------------

    def call(self, member: RemoteMember, method: str, path: str, payload: dict | None = None,
             ) -> tuple[int, dict]:
        """Call a node's ``/v0/node/...`` route; (status, JSON body). Raises NodeUnreachable."""
        body = json.dumps(payload).encode() if payload is not None else None
        response = member.node.request(method, path, body)
        try:
            data = response.read()
        except HTTPClientError as exc:
            raise NodeUnreachable(f"node {member.name}: {exc}") from exc
        try:
            parsed: Any = json.loads(data or b"{}")
        except ValueError:
            raise NodeUnreachable(f"node {member.name} answered {method} {path} with "
                                  f"something other than JSON") from None
        return response.status, parsed if isinstance(parsed, dict) else {}


def _row(member_id: int, name: str, kind: str, url: str | None, status: str, report: Report,
         now: float, seen: float, in_flight: int) -> dict:
    """A member's row of ``/v0/nodes``: its report, with its models as ids."""
    # An endpoint has none of a node's report (hardware, engines…) but its queue.
    reported = report.to_json() if isinstance(report, NodeReport) else {
        **NodeReport().to_json(), "queued_requests": report.queued_requests}
    return {
        "id": member_id, "name": name, "kind": kind, "url": url, "status": status,
        **reported, "models": model_ids(report.models), "in_flight": in_flight,
        "last_heartbeat": seen, "seconds_since_heartbeat": round(max(0.0, now - seen), 1),
    }

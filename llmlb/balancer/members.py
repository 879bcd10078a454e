"""The nodes a balancer routes to right now: the in-process node (standalone, a node's own
balancer side) and the registered ones, each seen through one interface (``Member``) whatever
its kind.

A remote member is a registry row plus the client that reaches it; clients (and their
connection pools) live as long as the worker and are rebuilt when a node's URL or secret
changes. What the members report (models, downloads, memory, queue) is what the node said in
its last heartbeat; what the balancer counts itself (requests in flight) comes from shared
memory. The in-process member is the node package's (``node/member.py``), handed in by the
role's builder; the balancer knows it by ``in_process``, nothing else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..config import ClusterSettings
from ..hardware import memory_of
from .credentials import CredentialError, describe, open_credential
from .http1 import HTTPClientError
from .inflight import InflightCounters
from .registry import COOLDOWN, ENDPOINT, ONLINE, NodeRecord, NodeRegistry
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

    def models(self) -> list[dict]: ...

    def queued(self) -> int:
        """Requests waiting there that the balancer does not count itself."""
        ...

    def free_memory(self) -> int: ...

    def pulling(self, model_id: str) -> bool: ...

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool: ...

    def report(self) -> dict: ...


class RemoteMember:
    """A registered node, as its last heartbeat described it."""

    in_process = False

    def __init__(self, record: NodeRecord, node: RemoteNode, status: str) -> None:
        self.record, self.node, self.status = record, node, status
        self.id, self.name, self.kind, self.url = record.id, record.name, record.kind, record.url

    def ready(self, model_id: str, request: ProxyRequest | None = None) -> bool:
        return model_id in self.record.models

    def models(self) -> list[dict]:
        return [m for m in self.record.report.get("models", ()) if isinstance(m, dict)]

    def queued(self) -> int:
        return int(self.record.report.get("queued_requests") or 0)

    def free_memory(self) -> int:
        return memory_of(self.record.report.get("hardware") or {}).free_bytes

    def downloads(self) -> list[dict]:
        return [d for d in self.record.report.get("downloads", ()) if isinstance(d, dict)]

    def pulling(self, model_id: str) -> bool:
        return any(d.get("model_id") == model_id and d.get("status") in DOWNLOADING_STATES
                   for d in self.downloads())

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        """Whether it can get the model: from its allowed sources (the catalog's), or from
        this balancer's copy (LB-4)."""
        return balancer_has_it or bool(self.record.report.get("can_download"))

    def report(self) -> dict:
        return self.record.report


class Cluster:
    def __init__(self, settings: ClusterSettings, registry: NodeRegistry | None,
                 inflight: InflightCounters, local: Member | None, *, home: Path,
                 pool_size: int) -> None:
        self.settings, self.registry, self.inflight, self.local = (
            settings, registry, inflight, local)
        self.home, self.pool_size = home, pool_size  # endpoint keys; connections per member
        self._clients: dict[int, tuple[tuple[str, str | None], RemoteNode]] = {}
        self._clients_lock = threading.Lock()

    def members(self, statuses: tuple[str, ...] = (ONLINE,)) -> list[Member]:
        """The members whose status is one of ``statuses``, the in-process one first."""
        found: list[Member] = [self.local] if self.local is not None else []
        if self.registry is not None:
            now = time.time()
            for record in self.registry.nodes():
                status = record.status(now, self.registry.timeout)
                if status in statuses:
                    found.append(RemoteMember(record, self.client(record), status))
        return found

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
            return open_credential(self.home, record.credential)
        except CredentialError as exc:  # its requests get a 401 and it cools down: say why
            log.warning("Endpoint %s: no API key to send: %s", record.name, exc)
            return None

    def endpoint_model(self, model: str) -> bool:
        """Whether an endpoint lists this model id (which may not be a valid llmlb id)."""
        model = model.lower()
        return self.registry is not None and any(
            r.kind == ENDPOINT and model in r.models for r in self.registry.nodes())

    def load(self, member: Member) -> int:
        return self.inflight.load(member.id) + member.queued()

    # --- views: listings, the node list ---------------------------------------------------

    def list_models(self) -> list[tuple[dict, list[str]]]:
        """Each model ready on a node that is up (online or cooling down), with the nodes."""
        by_id: dict[str, tuple[dict, list[str]]] = {}
        for member in self.members((ONLINE, COOLDOWN)):
            for entry in member.models():
                by_id.setdefault(entry["id"], (entry, []))[1].append(member.name)
        return [by_id[k] for k in sorted(by_id)]

    def locate(self, model_id: str) -> tuple[dict, list[str]] | None:
        found = [(m, m.name) for m in self.members((ONLINE, COOLDOWN)) if m.ready(model_id)]
        if not found:
            return None
        first = found[0][0]
        entry = next((e for e in first.models() if e["id"] == model_id), {"id": model_id})
        return entry, [name for _, name in found]

    def downloads(self) -> dict[str, list[tuple[str, dict]]]:
        """Downloads the remote nodes that are up report, by model id."""
        out: dict[str, list[tuple[str, dict]]] = {}
        for member in self.members((ONLINE, COOLDOWN)):
            if isinstance(member, RemoteMember):
                for d in member.downloads():
                    out.setdefault(str(d.get("model_id")), []).append((member.name, d))
        return out

    def describe(self) -> list[dict]:
        """``GET /v0/nodes``: every node with its status, report and load."""
        now = time.time()
        rows = []
        if self.local is not None:
            rows.append(_describe(self.local, self.local.report(), ONLINE, now, now,
                                  self.inflight.load(self.local.id)))
        for record in (self.registry.nodes(fresh=True) if self.registry else ()):
            status = record.status(now, self.registry.timeout)  # type: ignore[union-attr]
            row = _describe(RemoteMember(record, self.client(record), status), record.report,
                            status, now, record.last_seen, self.inflight.load(record.id))
            row.update({"registered_at": record.registered_at, "failures": record.failures,
                        "cooldown_until": record.cooldown_until if status == COOLDOWN
                        else None, "last_error": record.last_error})
            if record.kind == ENDPOINT:
                row.update(describe(record.credential), load_source=record.report.get(
                    "load_source"), endpoint_running=record.report.get("endpoint_running"),
                    endpoint_waiting=record.report.get("endpoint_waiting"),
                    last_check_error=record.report.get("error"))
            rows.append(row)
        return rows

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


def _describe(member: Member, report: dict, status: str, now: float, seen: float,
              in_flight: int) -> dict:
    models = [m["id"] for m in member.models() if "id" in m]
    return {
        "id": member.id, "name": member.name, "kind": member.kind, "url": member.url,
        "status": status, "models": sorted(models),
        "active_requests": int(report.get("active_requests") or 0),
        "queued_requests": int(report.get("queued_requests") or 0),
        "in_flight": in_flight,
        "hardware": report.get("hardware"), "formats": report.get("formats", []),
        "engines": report.get("engines", []), "loaded": report.get("loaded", []),
        "downloads": report.get("downloads", []),
        "can_download": bool(report.get("can_download")), "version": report.get("version"),
        "last_heartbeat": seen, "seconds_since_heartbeat": round(max(0.0, now - seen), 1),
    }

"""The nodes a balancer routes to right now: the in-process node (standalone) and the
registered ones, each seen through one interface (``Member``) whatever its kind.

A remote member is a registry row plus the client that reaches it; clients (and their
connection pools) live as long as the worker and are rebuilt when a node's URL or secret
changes. What the members report (models, downloads, memory, queue) is what the node said in
its last heartbeat; what the balancer counts itself (requests in flight) comes from shared
memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..hardware import Memory, memory_of
from ..model_info import listing_entry
from ..node import LocalNode
from .credentials import CredentialError, describe, open_credential
from .http1 import HTTPClientError
from .inflight import InflightCounters
from .providers import Providers
from .registry import COOLDOWN, ENDPOINT, ONLINE, PROVIDER, NodeRecord, NodeRegistry
from .upstream import InProcessNode, Node, NodeUnreachable, RemoteNode

log = logging.getLogger(__name__)
DOWNLOADING_STATES = ("queued", "downloading")


class LocalMember:
    """The node in this process; always online, never in cooldown (its failures are its
    models', not the network's)."""

    id = 0
    kind = "node"
    url = None
    record = None
    status = ONLINE

    def __init__(self, node: InProcessNode, local: LocalNode, memory: Callable[[], Memory],
                 report: Callable[[], dict]) -> None:
        self.node: Node = node
        self.name = node.name
        self.local, self._memory, self._report = local, memory, report

    def ready(self, model_id: str) -> bool:
        return self.local.find(model_id) is not None

    def models(self) -> list[dict]:
        return [listing_entry(m) for m in self.local.models()]

    def queued(self) -> int:
        return 0  # its waiting requests are already among the balancer's in flight

    def free_memory(self) -> int:
        return self._memory().free_bytes

    def pulling(self, model_id: str) -> bool:
        return self.local.resolver.download_state(model_id) == "running"

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        return True  # its resolver decides, with the errors standalone always gave

    def report(self) -> dict:
        return self._report()


class RemoteMember:
    """A registered node, as its last heartbeat described it."""

    def __init__(self, record: NodeRecord, node: RemoteNode, status: str) -> None:
        self.record, self.node, self.status = record, node, status
        self.id, self.name, self.kind, self.url = record.id, record.name, record.kind, record.url

    def ready(self, model_id: str) -> bool:
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


class ProviderMember(RemoteMember):
    """A hosted provider (``providers.py``): ready for every model name with its prefix,
    listed or not; it holds no files and fetches none."""

    def __init__(self, record: NodeRecord, node: Node, status: str) -> None:
        self.record, self.node, self.status = record, node, status  # type: ignore[assignment]
        self.id, self.name, self.kind, self.url = record.id, record.name, record.kind, record.url
        self._prefix = record.name + ":"

    def ready(self, model_id: str) -> bool:
        return model_id.startswith(self._prefix)

    def queued(self) -> int:
        return 0

    def free_memory(self) -> int:
        return 0

    def downloads(self) -> list[dict]:
        return []

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        return False


Member = LocalMember | RemoteMember


class Cluster:
    def __init__(self, settings: Settings, registry: NodeRegistry | None,
                 inflight: InflightCounters, local: LocalMember | None,
                 providers: Providers | None = None) -> None:
        self.settings, self.registry, self.inflight, self.local = (
            settings, registry, inflight, local)
        self.providers = providers
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
                    member = self._member(record, status)
                    if member is not None:
                        found.append(member)
        return found

    def _member(self, record: NodeRecord, status: str) -> RemoteMember | None:
        if record.kind != PROVIDER:
            return RemoteMember(record, self.client(record), status)
        # A provider's URL and key are this process's own settings, never the row's.
        node = self.providers.node(record.name) if self.providers is not None else None
        return ProviderMember(record, node, status) if node is not None else None

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
                                    pool_size=self.settings.concurrency,
                                    connect_timeout=self.settings.proxy_connect_timeout_seconds,
                                    read_timeout=self.settings.proxy_read_timeout_seconds)
                self._clients[record.id] = (identity, client)
            return self._clients[record.id][1]

    def _bearer(self, record: NodeRecord) -> str | None:
        """A node's secret; an endpoint's API key, opened (never kept in the row in clear)."""
        if record.kind != ENDPOINT:
            return record.secret
        try:
            return open_credential(self.settings.home, record.credential)
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
                                  self.inflight.load(0)))
        for record in (self.registry.nodes(fresh=True) if self.registry else ()):
            status = record.status(now, self.registry.timeout)  # type: ignore[union-attr]
            member = self._member(record, status)
            if member is None:  # another balancer's provider, which this one has no key for
                continue
            row = _describe(member, record.report, status, now, record.last_seen,
                            self.inflight.load(record.id))
            row.update({"registered_at": record.registered_at, "failures": record.failures,
                        "cooldown_until": record.cooldown_until if status == COOLDOWN
                        else None, "last_error": record.last_error})
            if record.kind == PROVIDER:
                row.update(has_api_key=True, api_key_env=member.node.spec.key_variable,  # type: ignore[union-attr]
                           last_check_error=record.report.get("error"))
            elif record.kind == ENDPOINT:
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

"""The node's side of the cluster (LB-1): what it reports, how it registers and sends
heartbeats, and whom it lets in.

Trust both ways rests on node-scope credentials, never on ``api`` keys:

- to the balancer, the node presents ``LLMLB_NODE_API_KEY``, a key with the node scope that
  the balancer checks against its own database, and its own secret, which proves that its
  name is its own (SC-7: a name belongs to the node that first registered it);
- to the node, the balancer presents that secret: the node made it (kept in the node's
  database, so all its workers and its restarts agree) and handed it over inside its
  authenticated registration. The balancer never needs, stores or sends the node key itself,
  and a copy of the balancer's database opens no more than the nodes' own APIs.

The node accepts nothing else (``sk_debug`` in development mode aside): not the node key,
since every node holds it and whatever it opened on one node it would open on all of them,
for each of them (a node could delete another's models); not an ``api`` key of the balancer.
An operator reaches a node through its balancer (``/v0/nodes``, the hub).

Several balancers sharing one state (``LLMLB_BALANCER_URL=http://a:8080,http://b:8080``) know
the same nodes, so the node talks to one at a time: the one that answered last, and when it
fails (unreachable, or a 5xx) the next in turn, which hears a registration first.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from .. import auth, errors
from ..balancer.inflight import InflightCounters
from ..balancer.reports import (
    Download,
    EngineInfo,
    Hardware,
    LoadedModel,
    LoadSettings,
    NodeReport,
    ReportError,
)
from ..config import ModelSettings, NodeSettings
from ..plugins import EngineRegistry
from ..resolver import Resolver
from ..state import State
from .hardware import describe as describe_hardware
from .member import IN_PROCESS_SLOT, ready_models
from .pool import ModelPool

log = logging.getLogger(__name__)

BALANCER_TIMEOUT = 10.0
NODE_SCOPES = frozenset({"api", "node"})


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmlb")
    except PackageNotFoundError:
        return None


class Reporter:
    """The node's report: hardware, engines and formats, models ready, loaded and being
    downloaded (with progress), requests in flight and queued."""

    def __init__(self, settings: ModelSettings, resolver: Resolver, pool: ModelPool,
                 engines: EngineRegistry, inflight: InflightCounters) -> None:
        self.settings, self.resolver, self.pool = settings, resolver, pool
        self.engines, self.inflight = engines, inflight
        self._version = _version()
        self._checked = threading.Event()
        self._checking = threading.Lock()

    def report(self) -> NodeReport:
        engines = self._engines()
        loaded = tuple(LoadedModel.parse(m, "loaded") for m in self.pool.loaded())
        return NodeReport(
            version=self.version,
            hardware=Hardware.parse(describe_hardware()),
            engines=engines,
            formats=tuple(sorted({e.format for e in engines if e.active and e.available})),
            models=ready_models(self.resolver),
            loaded=loaded,
            downloads=tuple(Download.parse(d, "downloads") for d in self.downloads()),
            active_requests=self.inflight.load(IN_PROCESS_SLOT),
            queued_requests=sum(m.waiting for m in loaded),
            can_download=self.resolver.hf.allowed,
            # what a pull must fit in memory besides the weights (placement)
            load_options=LoadSettings(self.pool.options.context_length,
                                      self.pool.options.parallel_sequences),
        )

    def _engines(self) -> tuple[EngineInfo, ...]:
        found = []
        for i, row in enumerate(self.engine_rows()):
            try:
                found.append(EngineInfo.parse(row, f"engines[{i}]"))
            except ReportError as exc:  # a plugin's odd answer must not keep the node out
                log.warning("An engine is left out of this node's report: %s", exc)
        return tuple(found)

    @property
    def version(self) -> str | None:
        return self._version

    def engine_rows(self) -> list[dict]:
        """The engines' rows once their first checks are done, [] until then: those import
        their libraries (torch: seconds), on a thread of their own, so that no report (the
        node's registration first) waits for them; the next report has them."""
        if self._checked.is_set():
            return self.engines.describe(self.pool.options)
        if self._checking.acquire(blocking=False):
            threading.Thread(target=self._check_engines, name="llmlb-engine-checks",
                             daemon=True).start()
        return []

    def _check_engines(self) -> None:
        try:
            self.engines.describe(self.pool.options)
        finally:
            self._checked.set()

    def downloads(self) -> list[dict]:
        out = []
        for record in self.resolver.progress.all():
            try:
                status = self.resolver.status(record.model_id)
            except Exception:  # noqa: BLE001 - gone between listing and reading
                continue
            if status["status"] in ("downloading", "error"):
                out.append(status)
        return out


class NodeAgent:
    """Registers this node with its balancer and keeps it informed (the supervisor's
    ``heartbeat`` task), and is the node's authenticator: who may call it."""

    sessions = False  # no users, no dashboard

    def __init__(self, settings: NodeSettings, dev: bool, db: State,
                 report: Callable[[], NodeReport]) -> None:
        self.settings, self.dev = settings, dev
        self.report = report
        # One secret per node, the same in every worker and across restarts.
        self.secret = db.setdefault_meta("node_secret", "sk-node-" + secrets.token_urlsafe(32))
        self.balancers = settings.balancer_urls
        self._current = 0  # the balancer that answered last
        self.registered = False
        self._announced = False
        self.last_beat = 0.0
        self._http = urllib3.PoolManager(
            num_pools=max(2, len(self.balancers)), maxsize=2, retries=False,
            timeout=urllib3.Timeout(connect=5, read=BALANCER_TIMEOUT))

    # --- who may call the node ----------------------------------------------------------

    def principal(self, key: str) -> auth.Principal:
        """The balancer (it holds this node's secret): everything a node serves (inference,
        model sync, its status), nothing of an operator's (local paths); else a 401."""
        if auth.same_secret(key, self.secret):
            return auth.Principal("node", "balancer", NODE_SCOPES)
        if self.dev and auth.same_secret(key, auth.DEV_API_KEY):
            return auth.Principal("dev", auth.DEV_API_KEY, frozenset(auth.SCOPES))
        raise errors.unauthorized("Invalid key: this node accepts only its balancer and its "
                                  "own node key")

    # --- talking to the balancer --------------------------------------------------------

    def beat(self) -> None:
        """One heartbeat, to the balancer that answered last; when it fails (unreachable, or
        a 5xx: its database away, nginx without it), to the next of ``LLMLB_BALANCER_URL``
        in turn, registering there first. Raises ConnectionError when none answers."""
        report = self.report().to_json()
        failures = []
        for turn in range(len(self.balancers)):
            balancer = self.balancers[(self._current + turn) % len(self.balancers)]
            try:
                self._beat_at(balancer, report)
            except BalancerAway as exc:
                failures.append(str(exc))
                self.registered = False  # the next one hears a registration first
                continue
            if turn:
                self._current = (self._current + turn) % len(self.balancers)
                log.warning("Heartbeats go to the balancer %s now (%s)", balancer,
                            "; ".join(failures))
            self.last_beat = time.monotonic()
            return
        raise ConnectionError("; ".join(failures))

    def _beat_at(self, balancer: str, report: dict) -> None:
        """A heartbeat to ``balancer``; registers first (again, when it forgot the node)."""
        if self.registered:
            status, body = self._post(balancer, f"/v0/nodes/{self.settings.node_name}/heartbeat",
                                      {"secret": self.secret, "report": report})
            if status == 404:
                log.warning("The balancer %s does not know this node any more; registering "
                            "again", balancer)
                self.registered = False
            else:
                self._check(status, body, "heartbeat")
        if not self.registered:
            if not self._announced:  # once: the supervisor logs each failure
                self._announced = True
                log.info("Registering with the balancer %s as node '%s'", balancer,
                         self.settings.node_name)
            status, body = self._post(balancer, "/v0/nodes", {
                "name": self.settings.node_name, "url": self.settings.advertise_url,
                "secret": self.secret, "report": report})
            self._check(status, body, "registration")
            self.registered = True
            log.info("Registered with the balancer %s as node '%s' (reachable at %s)",
                     balancer, self.settings.node_name, self.settings.advertise_url)

    def _post(self, balancer: str, path: str, payload: dict) -> tuple[int, dict]:
        try:
            response = self._http.request(
                "POST", f"{balancer}{path}", body=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {self.settings.node_api_key}"})
        except Urllib3Error as exc:
            raise BalancerAway(f"balancer {balancer} unreachable: {_cause(exc)}") from None
        try:
            body = json.loads(response.data or b"{}")
        except ValueError:
            body = {}
        if response.status >= 500:
            message = body.get("error") if isinstance(body, dict) else None
            message = message.get("message") if isinstance(message, dict) else None
            raise BalancerAway(f"balancer {balancer} answered HTTP {response.status}"
                               + (f": {message}" if isinstance(message, str) else ""))
        return response.status, body if isinstance(body, dict) else {}

    def _check(self, status: int, body: dict, what: str) -> None:
        if status < 300:
            return
        message = (body.get("error") or {}).get("message") or f"HTTP {status}"
        hint = (" (LLMLB_NODE_API_KEY must be a key with the node scope on the balancer)"
                if status in (401, 403) else "")
        raise PermissionError(f"the balancer refused this node's {what}: {message}{hint}")


class BalancerAway(ConnectionError):
    """A balancer did not answer, or answered that it cannot serve now (a 5xx): the next
    one is asked."""


def _cause(exc: BaseException) -> str:
    """The root cause in words that stay the same from one attempt to the next (urllib3's
    messages name objects by address), so the supervisor logs a failure once."""
    while exc.__context__ is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__

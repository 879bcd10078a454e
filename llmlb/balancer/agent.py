"""The node's side of the cluster (LB-1): what it reports, how it registers and sends
heartbeats, and whom it lets in.

Trust both ways rests on node-scope credentials, never on ``api`` keys:

- to the balancer, the node presents ``LLMLB_NODE_API_KEY``, a key with the node scope that
  the balancer checks against its own database;
- to the node, the balancer presents a secret the node made (kept in the node's database, so
  all its workers and its restarts agree) and handed over inside its authenticated
  registration. The balancer never needs, stores or sends the node key itself, and a copy of
  the balancer's database opens no more than the nodes' own APIs. The node also accepts its
  own node key (an operator with it can call the node directly), and, in development mode,
  ``sk_debug``. Anything else, an ``api`` key of the balancer included, is refused.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from .. import auth
from ..config import Settings
from ..hardware import describe as describe_hardware
from ..model_info import listing_entry
from ..model_pool import ModelPool
from ..plugins import EngineRegistry
from ..resolver import Resolver
from ..state import State
from .inflight import InflightCounters

log = logging.getLogger(__name__)

BALANCER_TIMEOUT = 10.0


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmlb")
    except PackageNotFoundError:
        return None


class Reporter:
    """The node's report: hardware, engines and formats, models ready, loaded and being
    downloaded (with progress), requests in flight and queued."""

    def __init__(self, settings: Settings, resolver: Resolver, pool: ModelPool,
                 engines: EngineRegistry, inflight: InflightCounters) -> None:
        self.settings, self.resolver, self.pool = settings, resolver, pool
        self.engines, self.inflight = engines, inflight
        self._version = _version()

    def report(self) -> dict:
        engines = self.engines.describe(self.pool.options)
        loaded = self.pool.loaded()
        return {
            "version": self.version,
            "hardware": describe_hardware(),
            "engines": engines,
            "formats": sorted({e["format"] for e in engines if e["active"] and e["available"]}),
            "models": [listing_entry(m) for m in self.resolver.list_models()],
            "loaded": loaded,
            "downloads": self.downloads(),
            "active_requests": self.inflight.load(0),
            "queued_requests": sum(int(m.get("waiting") or 0) for m in loaded),
            "can_download": self.resolver.hf.host in self.settings.download_allowlist,
        }

    @property
    def version(self) -> str | None:
        return self._version

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
    ``heartbeat`` task), and checks who may call the node."""

    def __init__(self, settings: Settings, db: State, report: Callable[[], dict]) -> None:
        self.settings = settings
        self.report = report
        # One secret per node, the same in every worker and across restarts.
        self.secret = db.setdefault_meta("node_secret", "sk-node-" + secrets.token_urlsafe(32))
        self.registered = False
        self.last_beat = 0.0
        self._http = urllib3.PoolManager(num_pools=2, maxsize=2, retries=False,
                                         timeout=urllib3.Timeout(connect=5, read=BALANCER_TIMEOUT))

    # --- who may call the node ----------------------------------------------------------

    def principal(self, key: str) -> auth.Principal | None:
        if auth.same_secret(key, self.secret):
            return auth.Principal("node", "balancer", frozenset({"node"}))
        own = self.settings.node_api_key
        if own and auth.same_secret(key, own):
            return auth.Principal("node", "node key", frozenset({"node"}))
        if self.settings.dev and auth.same_secret(key, auth.DEV_API_KEY):
            return auth.Principal("dev", auth.DEV_API_KEY, frozenset(auth.SCOPES))
        return None

    # --- talking to the balancer --------------------------------------------------------

    def beat(self) -> None:
        """One heartbeat; registers first (again, when the balancer forgot the node)."""
        report = self.report()
        if self.registered:
            status, body = self._post(f"/v0/nodes/{self.settings.node_name}/heartbeat",
                                      {"report": report})
            if status == 404:
                log.warning("The balancer does not know this node any more; registering again")
                self.registered = False
            else:
                self._check(status, body, "heartbeat")
        if not self.registered:
            status, body = self._post("/v0/nodes", {
                "name": self.settings.node_name, "url": self.settings.advertise_url,
                "secret": self.secret, "report": report})
            self._check(status, body, "registration")
            self.registered = True
            log.info("Registered with the balancer %s as node '%s' (reachable at %s)",
                     self.settings.balancer_url, self.settings.node_name,
                     self.settings.advertise_url)
        self.last_beat = time.monotonic()

    def _post(self, path: str, payload: dict) -> tuple[int, dict]:
        url = f"{self.settings.balancer_url}{path}"
        try:
            response = self._http.request(
                "POST", url, body=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {self.settings.node_api_key}"})
        except Urllib3Error as exc:
            self.registered = False  # it may have lost us while away
            raise ConnectionError(f"balancer {self.settings.balancer_url} unreachable: "
                                  f"{_cause(exc)}") from None
        try:
            body = json.loads(response.data or b"{}")
        except ValueError:
            body = {}
        return response.status, body if isinstance(body, dict) else {}

    def _check(self, status: int, body: dict, what: str) -> None:
        if status < 300:
            return
        message = (body.get("error") or {}).get("message") or f"HTTP {status}"
        hint = (" (LLMLB_NODE_API_KEY must be a key with the node scope on the balancer)"
                if status in (401, 403) else "")
        raise PermissionError(f"the balancer refused this node's {what}: {message}{hint}")


def _cause(exc: BaseException) -> str:
    """The root cause in words that stay the same from one attempt to the next (urllib3's
    messages name objects by address), so the supervisor logs a failure once."""
    while exc.__context__ is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__

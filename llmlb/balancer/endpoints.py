"""External OpenAI-compatible servers (vLLM, llama-server, Ollama, SGLang, another llmlb, a
hosted API) as members of the balancer (LB-5): rows of the node registry with kind
``endpoint``, routed to, cooled down and failed over exactly like llmlb's own nodes.

What differs from a node is who reports: a node sends heartbeats, an endpoint knows nothing of
llmlb, so the supervisor's ``endpoint-check`` task asks each one every
``LLMLB_ENDPOINT_CHECK_SECONDS`` for

- its models (``GET /v1/models``): a failed or malformed answer makes it offline, the next
  good one online again;
- its load, where it exposes Prometheus ``/metrics``: vLLM's ``vllm:num_requests_running`` /
  ``waiting``, llama-server's ``llamacpp:requests_processing`` / ``deferred``. The requests the
  balancer itself has in flight there are among those, so only the rest (other clients') is
  stored and added to the routing score; without metrics (Ollama, hosted APIs) the score is
  the balancer's own in-flight count.

Adding one checks it first: its name free, an http(s) URL that answers
``GET {base_url}/models`` with a model list and is not this llmlb itself (every llmlb answers
a request carrying ``X-LLMLB-Instance`` with its own instance id: the balancer sends its
own), else a 400 that says what went wrong. The paths asked are ``urls``' rule, the openai
SDK's: ``{base_url}/models``, ``{base_url}/chat/completions``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .. import errors, urls
from ..config import NODE_NAME, ClusterSettings
from ..state import State
from . import credentials, http1
from .credentials import EnvAllowlist
from .inflight import InflightCounters
from .registry import ENDPOINT, NameTaken, NodeRecord, NodeRegistry
from .reports import CHECKED_BY_METRICS, MAX_ITEMS, EndpointReport, ModelEntry, model_ids

log = logging.getLogger(__name__)

# Prometheus gauges of the servers we know: (running, waiting) names per server.
LOAD_METRICS = {
    "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
    "sglang:num_running_reqs": "running", "sglang:num_queue_reqs": "waiting",
    "llamacpp:requests_processing": "running", "llamacpp:requests_deferred": "waiting",
}
MAX_MODELS_BYTES = 4 * 1024 * 1024
INSTANCE_HEADER = "X-LLMLB-Instance"
NOT_CHECKED = "not checked by the balancer yet (its first check comes within " \
    "LLMLB_ENDPOINT_CHECK_SECONDS)"


def instance_id(db: State) -> str:
    """This llmlb's id (the same in every worker, kept in its database): how it recognises
    itself when asked to add itself as an endpoint."""
    return db.setdefault_meta("instance_id", secrets.token_urlsafe(16))


class IsThisLlmlb(ValueError):
    """The endpoint answered with this llmlb's own instance id."""


class KeyRefused(ValueError):
    """The endpoint answered 401 or 403: a wrong or missing API key."""


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    base_url: str
    api_key: str | None
    api_key_env: str | None


def endpoint_spec(body: dict, allowlist: EnvAllowlist) -> EndpointSpec:
    """The endpoint a ``POST /v0/endpoints`` body describes, or a 400 naming the field."""
    name, url = body.get("name"), body.get("base_url")
    api_key, api_key_env = body.get("api_key"), body.get("api_key_env")
    if name is None:
        raise errors.missing_parameter("name")
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise errors.invalid_request("Invalid value for 'name': 1-64 letters, digits, '.', '_' "
                                     "or '-', starting with a letter or digit", "name")
    if url is None:
        raise errors.missing_parameter(
            "base_url", " (the server's OpenAI base URL, such as http://gpu:8000/v1)")
    try:
        url = urls.check_url(url)
    except urls.BadURL as exc:
        raise errors.invalid_request(f"Invalid value for 'base_url': it {exc}",
                                     "base_url") from None
    if api_key is not None and (not isinstance(api_key, str) or not 1 <= len(api_key) <= 4096):
        raise errors.invalid_request("Invalid value for 'api_key': a string", "api_key")
    if api_key_env is not None:
        if not isinstance(api_key_env, str) or not credentials.ENV_NAME.fullmatch(api_key_env):
            raise errors.invalid_request("Invalid value for 'api_key_env': an environment "
                                         "variable name", "api_key_env")
        if not allowlist.allows(api_key_env):
            raise errors.invalid_request(f"Invalid value for 'api_key_env': "
                                         f"{allowlist.refusal(api_key_env)}", "api_key_env")
    if api_key is not None and api_key_env is not None:
        raise errors.invalid_request("Give 'api_key' or 'api_key_env', not both", "api_key")
    return EndpointSpec(name, url, api_key or None, api_key_env)


def _pool(url: str, timeout: float) -> http1.Pool:
    return http1.Pool(url, maxsize=2, connect_timeout=timeout, read_timeout=timeout)


def _get(pool: http1.Pool, path: str, key: str | None, limit: int, instance: str,
         ) -> tuple[int, bytes]:
    headers = {"Accept-Encoding": "identity", INSTANCE_HEADER: instance}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = pool.request("GET", path, None, headers)
    if response.header(INSTANCE_HEADER) == instance:
        response.close()
        raise IsThisLlmlb(f"GET {path} reached this llmlb itself")
    data = b""
    for chunk in response.chunks():
        data += chunk
        if len(data) > limit:
            response.close()
            raise http1.HTTPClientError(f"the answer is larger than {limit} bytes")
    return response.status, data


def fetch_models(pool: http1.Pool, base_url: str, key: str | None, instance: str,
                 ) -> tuple[ModelEntry, ...]:
    """The endpoint's ``GET {base_url}/models`` as model entries. Raises ValueError saying
    what is wrong (IsThisLlmlb when it is this llmlb), http1.HTTPClientError when it cannot
    be reached."""
    path = urls.endpoint_path(base_url, "/v1/models")
    status, data = _get(pool, path, key, MAX_MODELS_BYTES, instance)
    if status in (401, 403):
        raise KeyRefused(f"GET {path} answered HTTP {status} (a wrong or missing API key?)")
    if status != 200:
        raise ValueError(f"GET {path} answered HTTP {status}")
    try:
        listed = json.loads(data).get("data")
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        raise ValueError(f"GET {path} did not answer an OpenAI model list")
    found = (ModelEntry.listed(m, "endpoint") for m in listed)
    return tuple(m for m in found if m is not None)[:MAX_ITEMS]


def fetch_load(pool: http1.Pool, base_url: str, key: str | None, instance: str,
               ) -> dict[str, int] | None:
    """Requests running and waiting by the endpoint's own Prometheus metrics; None when it
    has none we know."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, data = _get(pool, urls.metrics_path(base_url), key, 8 * 1024 * 1024, instance)
    except http1.HTTPClientError:
        return None
    if status != 200:
        return None
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(data.decode("utf-8", "replace")):
            for sample in family.samples:
                which = LOAD_METRICS.get(sample.name)
                if which is not None:
                    found[which] = found.get(which, 0.0) + sample.value
    except (ValueError, TypeError):
        return None
    if not found:
        return None
    return {k: max(0, int(found.get(k, 0))) for k in ("running", "waiting")}


def probe(base_url: str, key: str | None, timeout: float, instance: str, *,
          key_elsewhere: bool = False) -> tuple[ModelEntry, ...]:
    """Check a new endpoint before it is added: its models, or a 400 saying what failed.
    ``key_elsewhere``: the key is not at hand here (another process reads it), so an
    answer that asks for one still shows the server is there."""
    pool = _pool(base_url, timeout)
    try:
        return fetch_models(pool, base_url, key, instance)
    except IsThisLlmlb:
        raise errors.endpoint_is_this_llmlb(base_url) from None
    except http1.HTTPClientError as exc:
        raise errors.invalid_request(f"The endpoint at {base_url} cannot be reached: {exc}",
                                     "base_url", code="endpoint_unreachable") from None
    except ValueError as exc:
        if key_elsewhere and isinstance(exc, KeyRefused):
            return ()
        raise errors.invalid_request(f"The endpoint at {base_url} is not usable: {exc}",
                                     "base_url", code="endpoint_unusable") from None
    finally:
        pool.close()


def add_endpoint(registry: NodeRegistry, home: Path, spec: EndpointSpec, *,
                 check_seconds: float, timeout: float, instance: str,
                 in_balancer: bool = True) -> NodeRecord:
    """Check and store an endpoint (its key sealed); 409 when the name is taken, checked
    before anything is asked of the URL. ``in_balancer``: this is the balancer's own
    process, whose check (its environment, its network) is the one that counts; otherwise
    (the CLI) the endpoint waits for the balancer's first check before it gets traffic."""
    try:
        registry.check_free(spec.name)
    except NameTaken as exc:
        raise errors.name_taken(spec.name, exc.why) from None
    key = spec.api_key
    if spec.api_key_env is not None:
        key = os.environ.get(spec.api_key_env)
        if not key and in_balancer:
            raise errors.invalid_request(f"The environment variable {spec.api_key_env} is not "
                                         "set on the balancer", "api_key_env")
    models = probe(spec.base_url, key, timeout, instance,
                   key_elsewhere=not in_balancer and spec.api_key_env is not None and not key)
    credential = (credentials.from_env(spec.api_key_env) if spec.api_key_env
                  else credentials.seal(home, spec.api_key) if spec.api_key else None)
    report = EndpointReport(healthy=True, models=models, check_seconds=check_seconds,
                            checked_at=time.time())
    if not in_balancer:
        report = EndpointReport(healthy=False, models=models, check_seconds=check_seconds,
                                error=NOT_CHECKED)
    try:
        record = registry.add_endpoint(spec.name, spec.base_url, report, credential)
    except NameTaken as exc:
        raise errors.name_taken(spec.name, exc.why) from None
    log.info("Endpoint %s added: %s with %d models", spec.name, spec.base_url, len(models))
    return record


def endpoint_json(record: NodeRecord, status: str) -> dict:
    """An endpoint as ``/v0/endpoints`` shows it: its status, last check error and last
    failure as ``/v0/nodes`` does; never its key."""
    report = record.report
    check_error = record.unusable or (report.error if isinstance(report, EndpointReport)
                                      else None)
    return {"id": record.id, "name": record.name, "kind": ENDPOINT, "base_url": record.url,
            "status": status, "models": model_ids(report.models),
            **credentials.describe(record.credential),
            "last_check_error": check_error, "last_error": record.last_error}


class EndpointWatch:
    """The supervisor's ``endpoint-check`` task: models, health and load of every endpoint,
    checked side by side (a hanging one delays none of the others)."""

    def __init__(self, settings: ClusterSettings, home: Path, registry: NodeRegistry,
                 inflight: InflightCounters, instance: str) -> None:
        self.settings, self.home, self.registry, self.inflight = (
            settings, home, registry, inflight)
        self.instance = instance
        self.allowlist = EnvAllowlist(settings.endpoint_env_allowlist)
        self.timeout = max(1.0, min(settings.endpoint_check_seconds,
                                    settings.proxy_connect_timeout_seconds * 2))
        self._pools: dict[int, tuple[str, http1.Pool]] = {}
        self._executor = ThreadPoolExecutor(8, thread_name_prefix="llmlb-endpoint-check")

    def __call__(self) -> None:
        endpoints = [r for r in self.registry.nodes(fresh=True)
                     if r.kind == ENDPOINT and r.unusable is None]
        for gone in set(self._pools) - {r.id for r in endpoints}:
            self._pools.pop(gone)[1].close()
        list(self._executor.map(self.check, endpoints))

    def check(self, record: NodeRecord) -> EndpointReport:
        known = self._pools.get(record.id)
        if known is None or known[0] != record.url:
            if known is not None:
                known[1].close()
            self._pools[record.id] = known = (record.url, _pool(record.url, self.timeout))
        pool = known[1]
        before = record.report
        assert isinstance(before, EndpointReport)
        in_flight = self.inflight.load(record.id)
        try:
            key = credentials.open_credential(self.home, record.credential, self.allowlist)
            models = fetch_models(pool, record.url, key, self.instance)
            load = fetch_load(pool, record.url, key, self.instance)
        except (http1.HTTPClientError, ValueError, credentials.CredentialError) as exc:
            error = (f"{record.url} is this llmlb itself" if isinstance(exc, IsThisLlmlb)
                     else str(exc))[:500]
            report = EndpointReport(healthy=False, models=before.models,
                                    check_seconds=self.settings.endpoint_check_seconds,
                                    checked_at=time.time(), error=error)
            if before.healthy or before.checked_at is None:  # was online, or never checked
                log.warning("Endpoint %s is offline: %s", record.name, error)
            self.registry.checked(record.id, report)
            return report
        report = EndpointReport(healthy=True, models=models,
                                check_seconds=self.settings.endpoint_check_seconds,
                                checked_at=time.time())
        if load is not None:
            report = replace(report, load_source=CHECKED_BY_METRICS,
                             endpoint_running=load["running"], endpoint_waiting=load["waiting"],
                             queued_requests=max(0, load["running"] + load["waiting"]
                                                 - in_flight))
        if not before.healthy:
            log.info("Endpoint %s is online%s", record.name,
                     "" if before.checked_at is None else " again")
        self.registry.checked(record.id, report)
        return report

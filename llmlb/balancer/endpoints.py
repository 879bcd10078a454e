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

Adding one checks it first: an http(s) URL that answers ``GET {base}/models`` with a model
list, else a 400 that says what went wrong.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import errors
from ..config import NODE_NAME, ClusterSettings
from . import credentials, http1
from .inflight import InflightCounters
from .registry import ENDPOINT, NodeRecord, NodeRegistry
from .upstream import RemoteNode

log = logging.getLogger(__name__)

# Prometheus gauges of the servers we know: (running, waiting) names per server.
LOAD_METRICS = {
    "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
    "sglang:num_running_reqs": "running", "sglang:num_queue_reqs": "waiting",
    "llamacpp:requests_processing": "running", "llamacpp:requests_deferred": "waiting",
}
MAX_MODELS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    base_url: str
    api_key: str | None
    api_key_env: str | None


def endpoint_spec(body: dict) -> EndpointSpec:
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
    if not isinstance(url, str):
        raise errors.invalid_request("Invalid value for 'base_url': a string", "base_url")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.invalid_request(f"Invalid value for 'base_url': an http:// or https:// URL "
                                     f"with a host, not {url[:200]!r}", "base_url")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise errors.invalid_request("Invalid value for 'base_url': no credentials, query or "
                                     "fragment in it (send the key as 'api_key')", "base_url")
    if api_key is not None and (not isinstance(api_key, str) or not 1 <= len(api_key) <= 4096):
        raise errors.invalid_request("Invalid value for 'api_key': a string", "api_key")
    if api_key_env is not None and (not isinstance(api_key_env, str)
                                    or not credentials.ENV_NAME.fullmatch(api_key_env)):
        raise errors.invalid_request("Invalid value for 'api_key_env': an environment "
                                     "variable name", "api_key_env")
    if api_key is not None and api_key_env is not None:
        raise errors.invalid_request("Give 'api_key' or 'api_key_env', not both", "api_key")
    return EndpointSpec(name, url.strip().rstrip("/"), api_key or None, api_key_env)


def _pool(url: str, timeout: float) -> tuple[http1.Pool, str]:
    base_path = RemoteNode.base_path_of(url)
    return http1.Pool(url, maxsize=2, connect_timeout=timeout, read_timeout=timeout), base_path


def _get(pool: http1.Pool, path: str, key: str | None, limit: int) -> tuple[int, bytes]:
    headers = {"Accept-Encoding": "identity"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = pool.request("GET", path, None, headers)
    data = b""
    for chunk in response.chunks():
        data += chunk
        if len(data) > limit:
            response.close()
            raise http1.HTTPClientError(f"the answer is larger than {limit} bytes")
    return response.status, data


def fetch_models(pool: http1.Pool, base_path: str, key: str | None) -> list[dict]:
    """The endpoint's ``GET /v1/models`` as model objects. Raises ValueError saying what is
    wrong, http1.HTTPClientError when it cannot be reached."""
    status, data = _get(pool, base_path + "/v1/models", key, MAX_MODELS_BYTES)
    if status != 200:
        raise ValueError(f"GET {base_path}/v1/models answered HTTP {status}"
                         + (" (a wrong or missing API key?)" if status in (401, 403) else ""))
    try:
        listed = json.loads(data).get("data")
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        raise ValueError(f"GET {base_path}/v1/models did not answer an OpenAI model list")
    models = []
    for m in listed:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
            models.append({"id": m["id"], "object": "model",
                           "created": m.get("created") if isinstance(m.get("created"), int)
                           else 0, "owned_by": str(m.get("owned_by") or "endpoint"),
                           "status": "ready"})
    return models


def fetch_load(pool: http1.Pool, base_path: str, key: str | None) -> dict[str, int] | None:
    """Requests running and waiting by the endpoint's own Prometheus metrics; None when it
    has none we know."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, data = _get(pool, base_path + "/metrics", key, 8 * 1024 * 1024)
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
    return {k: int(found.get(k, 0)) for k in ("running", "waiting")}


def probe(spec: EndpointSpec, timeout: float) -> list[dict]:
    """Check a new endpoint before it is added: its models, or a 400 saying what failed."""
    key = spec.api_key
    if spec.api_key_env is not None:
        import os

        key = os.environ.get(spec.api_key_env)
        if not key:
            raise errors.invalid_request(f"The environment variable {spec.api_key_env} is not "
                                         "set on the balancer", "api_key_env")
    pool, base_path = _pool(spec.base_url, timeout)
    try:
        return fetch_models(pool, base_path, key)
    except http1.HTTPClientError as exc:
        raise errors.invalid_request(f"The endpoint at {spec.base_url} cannot be reached: {exc}",
                                     "base_url", code="endpoint_unreachable") from None
    except ValueError as exc:
        raise errors.invalid_request(f"The endpoint at {spec.base_url} is not usable: {exc}",
                                     "base_url", code="endpoint_unusable") from None
    finally:
        pool.close()


def add_endpoint(registry: NodeRegistry, home: Path, spec: EndpointSpec, *,
                 check_seconds: float, timeout: float) -> NodeRecord:
    """Check and store an endpoint (its key sealed); 409 when the name is taken."""
    models = probe(spec, timeout)
    credential = (credentials.from_env(spec.api_key_env) if spec.api_key_env
                  else credentials.seal(home, spec.api_key) if spec.api_key else None)
    report = {"healthy": True, "models": models, "check_seconds": check_seconds,
              "load_source": "balancer", "checked_at": time.time()}
    record = registry.add_endpoint(spec.name, spec.base_url, report, credential)
    if record is None:
        raise errors.name_taken(spec.name, "is already used by a node or endpoint; remove it "
                                "first or choose another")
    log.info("Endpoint %s added: %s with %d models", spec.name, spec.base_url, len(models))
    return record


def endpoint_json(record: NodeRecord) -> dict:
    return {"id": record.id, "name": record.name, "kind": ENDPOINT, "base_url": record.url,
            "models": sorted(m["id"] for m in record.report.get("models", ())
                             if isinstance(m, dict) and "id" in m),
            **credentials.describe(record.credential)}


class EndpointWatch:
    """The supervisor's ``endpoint-check`` task: models, health and load of every endpoint,
    checked side by side (a hanging one delays none of the others)."""

    def __init__(self, settings: ClusterSettings, home: Path, registry: NodeRegistry,
                 inflight: InflightCounters) -> None:
        self.settings, self.home, self.registry, self.inflight = (
            settings, home, registry, inflight)
        self.timeout = max(1.0, min(settings.endpoint_check_seconds,
                                    settings.proxy_connect_timeout_seconds * 2))
        self._pools: dict[int, tuple[str, http1.Pool, str]] = {}
        self._executor = ThreadPoolExecutor(8, thread_name_prefix="llmlb-endpoint-check")

    def __call__(self) -> None:
        endpoints = [r for r in self.registry.nodes(fresh=True) if r.kind == ENDPOINT]
        for gone in set(self._pools) - {r.id for r in endpoints}:
            self._pools.pop(gone)[1].close()
        list(self._executor.map(self.check, endpoints))

    def check(self, record: NodeRecord) -> dict:
        known = self._pools.get(record.id)
        if known is None or known[0] != record.url:
            if known is not None:
                known[1].close()
            pool, base_path = _pool(record.url, self.timeout)
            self._pools[record.id] = known = (record.url, pool, base_path)
        _, pool, base_path = known
        report: dict = {"check_seconds": self.settings.endpoint_check_seconds,
                        "checked_at": time.time(), "load_source": "balancer"}
        in_flight = self.inflight.load(record.id)
        try:
            key = credentials.open_credential(self.home, record.credential)
            report["models"] = fetch_models(pool, base_path, key)
            load = fetch_load(pool, base_path, key)
        except (http1.HTTPClientError, ValueError, credentials.CredentialError) as exc:
            report.update(healthy=False, error=str(exc),
                          models=record.report.get("models", []))
            if record.report.get("healthy", True):
                log.warning("Endpoint %s is offline: %s", record.name, exc)
            self.registry.checked(record.id, report)
            return report
        report["healthy"] = True
        if load is not None:
            report.update(load_source="metrics", endpoint_running=load["running"],
                          endpoint_waiting=load["waiting"],
                          queued_requests=max(0, load["running"] + load["waiting"] - in_flight))
        if not record.report.get("healthy", True):
            log.info("Endpoint %s is online again", record.name)
        self.registry.checked(record.id, report)
        return report

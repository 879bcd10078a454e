"""``/v0/endpoints`` (admin): add, list and remove external OpenAI-compatible servers. They are
listed with the nodes too (``GET /v0/nodes``, ``kind: "endpoint"``); their API key never comes
back (``has_api_key``)."""

from __future__ import annotations

from flask import Blueprint

from .. import errors
from ..balancer.credentials import EnvAllowlist
from ..balancer.endpoints import add_endpoint, endpoint_json, endpoint_spec
from ..balancer.registry import ENDPOINT
from .common import json_body, registry, require, respond, runtime

bp = Blueprint("endpoints", __name__, url_prefix="/v0/endpoints")


@bp.get("")
@require("admin")
def list_endpoints():
    nodes = registry()
    return respond({"data": [endpoint_json(r, nodes.status(r))
                             for r in nodes.nodes(fresh=True) if r.kind == ENDPOINT]})


@bp.post("")
@require("admin")
def add():
    rt = runtime()
    settings = rt.settings
    spec = endpoint_spec(json_body(), EnvAllowlist(settings.cluster.endpoint_env_allowlist))
    record = add_endpoint(registry(), settings.files.home, spec,
                          check_seconds=settings.cluster.endpoint_check_seconds,
                          timeout=max(2.0, settings.cluster.proxy_connect_timeout_seconds),
                          instance=rt.instance_id)
    return respond(endpoint_json(record, registry().status(record)), status=201)


@bp.delete("/<name>")
@require("admin")
def remove(name: str):
    nodes = registry()
    record = nodes.get(name)
    if record is None or record.kind != ENDPOINT:
        raise errors.endpoint_not_found(name)
    nodes.remove(name)
    return respond({"name": name, "deleted": True})

"""``/v0/endpoints`` (admin): add, list and remove external OpenAI-compatible servers. They are
listed with the nodes too (``GET /v0/nodes``, ``kind: "endpoint"``); their API key never comes
back (``has_api_key``)."""

from __future__ import annotations

from flask import Blueprint

from .. import errors
from ..balancer.endpoints import add_endpoint, endpoint_json, endpoint_spec
from ..balancer.registry import ENDPOINT
from .common import json_body, registry, require, respond, runtime

bp = Blueprint("endpoints", __name__, url_prefix="/v0/endpoints")


@bp.get("")
@require("admin")
def list_endpoints():
    records = [r for r in registry().nodes(fresh=True) if r.kind == ENDPOINT]
    return respond({"data": [endpoint_json(r) for r in records]})


@bp.post("")
@require("admin")
def add():
    rt = runtime()
    settings = rt.settings
    spec = endpoint_spec(json_body())
    if rt.cluster.local is not None and spec.name == rt.cluster.local.name:
        raise errors.name_taken(spec.name, "is this llmlb's own node; choose another")
    record = add_endpoint(registry(), settings.files.home, spec,
                          check_seconds=settings.cluster.endpoint_check_seconds,
                          timeout=max(2.0, settings.cluster.proxy_connect_timeout_seconds))
    return respond(endpoint_json(record), status=201)


@bp.delete("/<name>")
@require("admin")
def remove(name: str):
    nodes = registry()
    record = nodes.get(name)
    if record is None or record.kind != ENDPOINT:
        raise errors.endpoint_not_found(name)
    nodes.remove(name)
    return respond({"name": name, "deleted": True})

"""``/v0``: llmlb's own API for nodes and operators (manifests, engines), and ``/health``."""

from __future__ import annotations

from flask import Blueprint, g, request

from .. import errors
from ..model_info import manifest
from ..node.pool import load_options
from ..plugins import public_row
from ..storage import requested_model_id
from .common import require, respond, runtime

bp = Blueprint("registry", __name__)


@bp.get("/health")
def health():
    """Liveness for load balancers and nginx; needs no key."""
    return respond({"status": "ok"})


@bp.get("/v0/models/registry/<path:model_id>/manifest.json")
@require("node", "api")
def model_manifest(model_id: str):
    model_id = requested_model_id(model_id)
    rt = runtime()
    local = rt.resolver.find(model_id)
    entry = rt.catalog.get(model_id)
    if local is None and entry is None:
        raise errors.model_not_found(model_id, in_catalog_hint=False)
    blob_base = request.host_url.rstrip("/") + "/v1/models/blob"
    return respond(manifest(model_id, local, entry, rt.settings.models.hf_endpoint, blob_base))


@bp.get("/v0/models/<path:model_id>/status")
@require("api", "node")
def model_status(model_id: str):
    body = runtime().resolver.status(requested_model_id(model_id))
    if not g.principal.allows("admin"):  # where llmlb keeps its files is for operators only
        body.pop("local_path", None)
    return respond(body)


@bp.get("/v0/engines")
@require("api")
def engines():
    rt = runtime()
    pool = rt.pool  # none where no model runs (a balancer)
    options = pool.options if pool is not None else load_options(rt.settings.inference)
    rows = rt.engines.describe(options)
    if not g.principal.allows("admin"):  # where plugins live is for operators only
        rows = [public_row(row) for row in rows]
    return respond({"engines": rows, "loaded": pool.loaded() if pool is not None else []})

"""``/v1``: the OpenAI API. Thin: each inference request goes to the balancer, which hands it
to a node (this process's own, or another machine's) and relays the answer."""

from __future__ import annotations

from flask import Blueprint, send_file

from .. import errors
from ..balancer.upstream import CHAT, COMPLETION, EMBEDDINGS
from ..model_info import blob_path, catalog_object, model_object
from ..storage import requested_model_id
from .common import forward_request, require, respond, runtime

bp = Blueprint("openai", __name__, url_prefix="/v1")


@bp.get("/models")
@require("api")
def list_models():
    listed = runtime().cluster.list_models()
    return respond({"object": "list", "data": [model_object(m, n) for m, n in listed]})


@bp.get("/models/<path:model_id>")
@require("api")
def get_model(model_id: str):
    rt = runtime()
    try:
        model_id = requested_model_id(model_id)
    except errors.APIError:  # an endpoint's own id (Ollama's llama3.2:1b) is fine
        if not rt.cluster.endpoint_model(model_id):
            raise
        model_id = model_id.lower()
    located = rt.cluster.locate(model_id)
    if located is not None:
        return respond(model_object(*located))
    entry = rt.catalog.get(model_id)
    if entry is not None:  # not on disk: fetched when first used; say how far along that is
        return respond(catalog_object(entry, rt.hub.download_status(model_id)))
    raise errors.model_not_found(model_id, in_catalog_hint=False)


@bp.get("/models/blob/<path:rest>")
@require("node")
def model_blob(rest: str):
    """A model file for nodes that sync from this balancer (LB-4); Range requests work."""
    path = blob_path(rest, runtime().resolver.find)
    return send_file(path, conditional=True, etag=True, max_age=0,
                     mimetype="application/octet-stream")


@bp.post("/chat/completions")
@require("api")
def chat_completions():
    return forward_request(CHAT)


@bp.post("/completions")
@require("api")
def completions():
    return forward_request(COMPLETION)


@bp.post("/embeddings")
@require("api")
def embeddings():
    return forward_request(EMBEDDINGS, watch_client=False)

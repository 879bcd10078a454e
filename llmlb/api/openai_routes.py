"""``/v1``: the OpenAI API. Thin: parse, call the serving layer, respond."""

from __future__ import annotations

from flask import Blueprint, send_file

from .. import errors
from ..model_info import catalog_object, model_object
from ..serving import openai as serving
from ..serving.protocol import PromptLimits
from ..storage import InvalidModelId, normalize_model_id
from .common import json_body, require, respond, runtime

bp = Blueprint("openai", __name__, url_prefix="/v1")


def valid_id(raw: str) -> str:
    try:
        return normalize_model_id(raw)
    except InvalidModelId as exc:
        raise errors.invalid_model_id(str(exc)) from None


@bp.get("/models")
@require("api")
def list_models():
    listed = runtime().dispatcher.list_models()
    return respond({"object": "list", "data": [model_object(m, n) for m, n in listed]})


@bp.get("/models/<path:model_id>")
@require("api")
def get_model(model_id: str):
    model_id = valid_id(model_id)
    rt = runtime()
    located = rt.dispatcher.locate(model_id)
    if located is not None:
        return respond(model_object(*located))
    entry = rt.catalog.get(model_id)
    if entry is not None:  # not on disk: fetched when first used; say how far along that is
        return respond(catalog_object(entry, rt.resolver.status(model_id)["status"]))
    raise errors.model_not_found(model_id, in_catalog_hint=False)


@bp.get("/models/blob/<path:rest>")
@require("node")
def model_blob(rest: str):
    """A model file for nodes that sync from this balancer (LB-4); Range requests work."""
    path = runtime().node.blob_path(rest)
    return send_file(path, conditional=True, etag=True, max_age=0,
                     mimetype="application/octet-stream")


@bp.post("/chat/completions")
@require("api")
def chat_completions():
    rt = runtime()
    return respond(serving.chat_completion(rt.dispatcher, json_body(), _limits(rt)))


@bp.post("/completions")
@require("api")
def completions():
    rt = runtime()
    return respond(serving.completion(rt.dispatcher, json_body(), _limits(rt)))


@bp.post("/embeddings")
@require("api")
def embeddings():
    rt = runtime()
    return respond(serving.embeddings(rt.dispatcher, json_body(), _limits(rt)))


def _limits(rt) -> PromptLimits:  # noqa: ANN001 - the Runtime
    return PromptLimits.from_settings(rt.settings)

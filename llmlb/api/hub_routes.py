"""``/api/models``: the model hub for admins and the dashboard (HB-1..HB-3)."""

from __future__ import annotations

from flask import Blueprint

from .. import errors
from ..storage import requested_model_id
from .common import json_body, require, respond, runtime

bp = Blueprint("hub", __name__, url_prefix="/api")


@bp.get("/models")
@require("admin")
def list_models():
    return respond({"models": runtime().hub.list_models()})


@bp.get("/models/local")
@require("admin")
def local_models():
    return respond({"models": runtime().hub.local_models()})


@bp.post("/models/register")
@require("admin")
def register():
    model_id = json_body().get("model_id")
    if not isinstance(model_id, str):
        raise errors.invalid_request("Missing required parameter: 'model_id'", "model_id",
                                     code="missing_required_parameter")
    result = runtime().hub.register(requested_model_id(model_id))
    return respond(result, status=202 if result["status"] == "Registered" else 200)


@bp.delete("/models/<path:model_id>")
@require("admin")
def delete(model_id: str):
    return respond(runtime().hub.delete(requested_model_id(model_id)))

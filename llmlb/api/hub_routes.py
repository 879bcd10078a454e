"""``/api/models``: the model hub for admins and the dashboard (HB-1..HB-3)."""

from __future__ import annotations

from flask import Blueprint

from .common import delete_model, register_model, require, respond, runtime

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
    return register_model()


@bp.delete("/models/<path:model_id>")
@require("admin")
def delete(model_id: str):
    return delete_model(model_id)

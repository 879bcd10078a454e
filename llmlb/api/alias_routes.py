"""``/v0/aliases`` (admin): model aliases (AG-5), a name agents use standing for a list of
models, the first that can serve answering."""

from __future__ import annotations

from flask import Blueprint, Response

from .. import errors
from ..aliases import Aliases, alias_spec
from ..storage import requested_model_id
from .common import json_body, require, respond, runtime

bp = Blueprint("aliases", __name__, url_prefix="/v0/aliases")


def _aliases() -> Aliases:
    found = runtime().balancer.aliases
    assert found is not None  # registered only where the balancer has them
    return found


@bp.get("")
@require("admin")
def list_aliases() -> Response:
    return respond({"data": [{"name": name, "models": models}
                             for name, models in _aliases().all().items()]})


@bp.put("/<path:name>")
@require("admin")
def set_alias(name: str) -> Response:
    name, models = alias_spec(name, json_body().get("models"))
    _aliases().set(name, models)
    return respond({"name": name, "models": models})


@bp.delete("/<path:name>")
@require("admin")
def remove_alias(name: str) -> Response:
    name = requested_model_id(name)
    if not _aliases().remove(name):
        raise errors.alias_not_found(name)
    return respond({"name": name, "deleted": True})

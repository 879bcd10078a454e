"""The cluster's HTTP API. On a balancer (``bp``): nodes register and send heartbeats (node
scope); operators list and forget nodes (admin). On a node (``node_bp``): what its balancer
asks of it besides inference: pull or delete a model, its report now."""

from __future__ import annotations

from flask import Blueprint

from .. import errors
from ..balancer.registry import NameTaken, registration, report_of
from .common import delete_model, json_body, register_model, registry, require, respond, runtime

bp = Blueprint("nodes", __name__, url_prefix="/v0/nodes")
node_bp = Blueprint("node", __name__, url_prefix="/v0/node")


@bp.get("")
@require("admin")
def list_nodes():
    return respond({"data": runtime().cluster.describe()})


@bp.post("")
@require("node")
def register():
    name, url, secret, report = registration(json_body())
    try:
        record = registry().register(name, url, report, secret=secret)
    except NameTaken as taken:
        what = "a hosted provider" if str(taken) == "provider" else "an external endpoint"
        raise errors.name_taken(name, f"belongs to {what}; start the node with another "
                                "--name") from None
    return respond({"id": record.id, "name": record.name, "url": record.url,
                    "heartbeat_seconds": runtime().settings.heartbeat_seconds}, status=201)


@bp.post("/<name>/heartbeat")
@require("node")
def heartbeat(name: str):
    if not registry().heartbeat(name, report_of(json_body())):
        raise errors.node_not_found(name)
    return respond({"name": name, "ok": True})


@bp.delete("/<name>")
@require("admin")
def forget(name: str):
    if not registry().remove(name):
        raise errors.node_not_found(name)
    return respond({"name": name, "deleted": True})


@node_bp.post("/pull")
@require("node")
def pull():
    return register_model()


@node_bp.delete("/models/<path:model_id>")
@require("node")
def delete(model_id: str):
    return delete_model(model_id)


@node_bp.get("/report")
@require("node")
def report():
    return respond(runtime().reporter.report())

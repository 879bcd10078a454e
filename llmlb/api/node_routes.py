"""The cluster's HTTP API. On a balancer (``bp``): nodes register and send heartbeats (node
scope, and the node's own secret for its name: SC-7); operators list and forget nodes (admin).
On a node (``node_bp``): what its balancer asks of it besides inference: pull or delete a
model, its report now, its in-process member's (only the balancer holding the node's secret
may: see ``node/agent.py``)."""

from __future__ import annotations

import logging

from flask import Blueprint, g, request

from .. import errors
from ..balancer.registration import node_report, node_secret, registration
from ..balancer.registry import NameTaken
from .common import delete_model, json_body, register_model, registry, require, respond, runtime

log = logging.getLogger(__name__)
bp = Blueprint("nodes", __name__, url_prefix="/v0/nodes")
node_bp = Blueprint("node", __name__, url_prefix="/v0/node")


@bp.get("")
@require("admin")
def list_nodes():
    return respond({"data": runtime().cluster.describe()})


@bp.post("")
@require("node")
def register():
    node = registration(json_body())
    try:
        record = registry().register(node.name, node.url, node.report, secret=node.secret)
    except NameTaken as exc:
        raise _refused(exc, "registration", node.url) from None
    return respond({"id": record.id, "name": record.name, "url": record.url,
                    "heartbeat_seconds": runtime().settings.cluster.heartbeat_seconds}, status=201)


@bp.post("/<name>/heartbeat")
@require("node")
def heartbeat(name: str):
    body = json_body()
    secret, report = node_secret(body), node_report(body)
    try:
        known = registry().heartbeat(name, secret, report)
    except NameTaken as exc:
        raise _refused(exc, "heartbeat") from None
    if not known:
        raise errors.node_not_found(name)
    return respond({"name": name, "ok": True})


def _refused(exc: NameTaken, what: str, url: str | None = None) -> errors.APIError:
    """Say who tried to take a name that is not theirs, and refuse it."""
    log.warning("Refused a node %s as '%s' from %s (key '%s')%s: the name %s", what, exc.name,
                request.remote_addr, g.principal.name, f", advertising {url}" if url else "",
                exc.taken_by)
    return errors.name_taken(exc.name, exc.why)


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
    return respond(runtime().cluster.local.report().to_json())  # type: ignore[union-attr]

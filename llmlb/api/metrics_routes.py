"""Observability (LB-6, QT-3): ``GET /metrics`` for Prometheus, ``GET /v0/requests`` (admin)
for the request history with filters, ``GET /v0/usage`` (admin) and ``/v0/usage/me`` (a key's
own) for usage per hour or day from the roll-ups."""

from __future__ import annotations

import math
import time

from flask import Blueprint, Response, g, request

from .. import errors, usage
from ..wire import dumps
from .common import require, respond, runtime

bp = Blueprint("metrics", __name__)
MAX_LIMIT = 1000


@bp.get("/metrics")
@require("api", "node")
def metrics():
    """Any valid key may read it (Prometheus sends one as ``authorization: credentials``)."""
    data, content_type = runtime().metrics.scrape()
    return Response(data, content_type=content_type)


def _number(name: str, kind: type = float):  # noqa: ANN202 - float | int | None
    raw = request.args.get(name)
    if raw in (None, ""):
        return None
    try:
        return kind(raw)
    except ValueError:
        raise errors.invalid_request(f"Invalid value for '{name}': a number", name) from None


@bp.get("/v0/requests")
@require("admin")
def requests_history():
    args = request.args
    status = args.get("status") or None
    if status is not None and not (status == "error" or status.isdigit() and len(status) == 3
                                   or len(status) == 3 and status[0].isdigit()
                                   and status[1:] == "xx"):
        raise errors.invalid_request("Invalid value for 'status': a code (429), a class (5xx) "
                                     "or 'error'", "status")
    limit = _number("limit", int) or 100
    if not 1 <= limit <= MAX_LIMIT:
        raise errors.invalid_request(f"Invalid value for 'limit': 1 to {MAX_LIMIT}", "limit")
    rows = runtime().history.query(
        model=args.get("model") or None, node=args.get("node") or None,
        key_name=args.get("key") or None, status=status, since=_number("since"),
        until=_number("until"), limit=limit, before_id=_number("before_id", int))
    return respond({"object": "list", "data": rows,
                    "next_before_id": rows[-1]["id"] if len(rows) == limit else None})


def _usage(key: str | None) -> Response:
    args = request.args
    bucket = args.get("bucket") or "hour"
    if bucket not in usage.SPANS:
        raise errors.invalid_request("Invalid value for 'bucket': hour or day", "bucket")
    group = args.get("group") or None
    if group is not None and group not in usage.GROUPS:
        raise errors.invalid_request("Invalid value for 'group': key, model or node", "group")
    until = _number("to")
    since = _number("from")
    for name, value in (("from", since), ("to", until)):
        if value is not None and not (math.isfinite(value) and 0 <= value < 1e11):
            raise errors.invalid_request(f"Invalid value for '{name}': seconds since the "
                                         "epoch", name)
    if since is None:
        since = (until or time.time()) - (86400 if bucket == "hour" else 30 * 86400)
    filters = {"key": key if key is not None else args.get("key") or None,
               "model": args.get("model") or None, "node": args.get("node") or None}
    # Thousands of points: written by orjson, not the slower json behind jsonify.
    return Response(dumps(usage.report(runtime().db.usage, bucket=bucket, group=group,
                                       filters=filters, since=since, until=until)),
                    mimetype="application/json")


@bp.get("/v0/usage")
@require("admin")
def usage_all():
    return _usage(None)


@bp.get("/v0/usage/me")
@require("api")
def usage_me():
    """The caller's own usage: the key's (or the dashboard user's) name."""
    return _usage(g.principal.name)

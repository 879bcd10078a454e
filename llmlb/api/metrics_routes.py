"""Observability (LB-6): ``GET /metrics`` for Prometheus, ``GET /v0/requests`` (admin) for the
request history with filters."""

from __future__ import annotations

from flask import Blueprint, Response, request

from .. import errors
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

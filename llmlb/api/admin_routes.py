"""``/api/keys``: API key management for admins (the dashboard and scripts), limits included
(QT-1): set at creation, changed with ``PATCH``, listed with their current use."""

from __future__ import annotations

import time

from flask import Blueprint

from .. import auth, errors
from ..limits import NUMBERS, current_use, parse_limits
from .common import json_body, require, respond, runtime

bp = Blueprint("admin", __name__, url_prefix="/api")
LIMIT_FIELDS = (*NUMBERS, "models")


def _key_json(k: auth.KeyRecord, use: dict[str, int] | None = None) -> dict:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
            "created_at": k.created_at, "last_used_at": k.last_used_at, "revoked": k.revoked,
            "limits": k.limits.as_dict(),
            "use": use if use is not None else dict.fromkeys(NUMBERS, 0)}


def _limits(body: dict, base=None):  # noqa: ANN001, ANN202 - Limits in, Limits out
    try:
        return parse_limits({f: body[f] for f in LIMIT_FIELDS if f in body}, base)
    except ValueError as exc:
        field = next((f for f in LIMIT_FIELDS if str(exc).startswith(f)), None)
        raise errors.invalid_request(str(exc), field) from None


@bp.get("/keys")
@require("admin")
def list_keys():
    db = runtime().db
    keys = auth.list_api_keys(db)
    use = current_use(db.quotas, [k.id for k in keys if k.limits.counted], time.time())
    return respond({"keys": [_key_json(k, use.get(k.id)) for k in keys]})


@bp.post("/keys")
@require("admin")
def create_key():
    body = json_body()
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise errors.missing_parameter("name")
    scopes = body.get("scopes", ["api"])
    limits = _limits(body)
    try:
        key, record = auth.create_api_key(runtime().db, name.strip(), scopes, limits)
    except ValueError as exc:
        raise errors.invalid_request(str(exc), "scopes") from None
    return respond({**_key_json(record), "key": key}, status=201)


@bp.patch("/keys/<int:key_id>")
@require("admin")
def update_key(key_id: int):
    """Change a key's limits: the fields given (null removes a limit)."""
    body = json_body()
    db = runtime().db
    current = auth.get_api_key(db, key_id)
    if current is None or current.revoked:
        raise errors.key_not_found(key_id)
    record = auth.set_key_limits(db, key_id, _limits(body, current.limits))
    if record is None:
        raise errors.key_not_found(key_id)
    use = current_use(db.quotas, [key_id], time.time()).get(key_id)
    return respond(_key_json(record, use))


@bp.delete("/keys/<int:key_id>")
@require("admin")
def revoke_key(key_id: int):
    if not auth.revoke_api_key(runtime().db, key_id):
        raise errors.key_not_found(key_id)
    return respond({"id": key_id, "revoked": True})

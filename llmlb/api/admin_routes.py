"""``/api/keys``: API key management for admins (the dashboard and scripts)."""

from __future__ import annotations

from flask import Blueprint

from .. import auth, errors
from .common import json_body, require, respond, runtime

bp = Blueprint("admin", __name__, url_prefix="/api")


def _key_json(k: auth.KeyRecord) -> dict:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
            "created_at": k.created_at, "last_used_at": k.last_used_at, "revoked": k.revoked}


@bp.get("/keys")
@require("admin")
def list_keys():
    return respond({"keys": [_key_json(k) for k in auth.list_api_keys(runtime().db)]})


@bp.post("/keys")
@require("admin")
def create_key():
    body = json_body()
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise errors.missing_parameter("name")
    scopes = body.get("scopes", ["api"])
    try:
        key, record = auth.create_api_key(runtime().db, name.strip(), scopes)
    except ValueError as exc:
        raise errors.invalid_request(str(exc), "scopes") from None
    return respond({**_key_json(record), "key": key}, status=201)


@bp.delete("/keys/<int:key_id>")
@require("admin")
def revoke_key(key_id: int):
    if not auth.revoke_api_key(runtime().db, key_id):
        raise errors.key_not_found(key_id)
    return respond({"id": key_id, "revoked": True})

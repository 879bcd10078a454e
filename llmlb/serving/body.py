"""Request bodies: the JSON object a route needs, or a 400 that says what is wrong with it."""

from __future__ import annotations

import json

from .. import errors


def parse_json_object(raw: bytes) -> dict:
    if not raw.strip():
        raise errors.invalid_json("the body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_json(str(exc)) from None
    except RecursionError:
        raise errors.invalid_json("the JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.invalid_request("The request body must be a JSON object")
    return data

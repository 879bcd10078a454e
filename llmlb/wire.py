"""The OpenAI wire format as both sides of llmlb meet it, the balancer that passes requests on
and the node that serves them: a request body as the JSON object a route needs (or a 400 that
says what is wrong with it), one server-sent event (``event``, and the named events of the
Responses and Messages APIs: ``named_event``), and the events of a stream read back
(``data_of``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

import orjson

from . import errors

# JSON escapes of UTF-16 surrogates: pairs decode to one character, lone ones stay in the
# string and break every later encode (tokenizers, logs, responses) with a 500.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        raise errors.invalid_json("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                  "which is not text")
    return data


def _has_lone_surrogate(data: object) -> bool:
    stack = [data]
    while stack:  # iterative: the data may be nested as deep as json.loads allows
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


DONE = "data: [DONE]\n\n"  # the last event of every stream


def event(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def dumps(value: object) -> bytes:
    """Compact JSON, UTF-8 as it is (``json.dumps(ensure_ascii=False)``'s), fast (orjson);
    what orjson refuses (an integer beyond 64 bits a client sent, a lone surrogate an
    upstream sent) written by ``json``."""
    try:
        return orjson.dumps(value)
    except TypeError:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def named_event(name: str, payload: dict) -> bytes:
    """One server-sent event with its name (``event:``), as the Responses and Messages APIs
    send theirs, as bytes: made once per token where the balancer translates a stream."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


def loads(data: bytes) -> object:
    """JSON from an upstream, fast (orjson); what orjson refuses and ``json`` reads (NaN,
    Infinity, a lone surrogate escape) read by ``json``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def data_of(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The ``data`` of each event of a server-sent event stream, from its bytes as they come
    (lines ending in LF or CRLF, as Gemini sends them); comments and other fields skipped."""
    pending = b""
    data: list[bytes] = []
    for chunk in chunks:
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
    if pending.startswith(b"data:"):
        data.append(pending[5:].strip())
    if data:
        yield b"\n".join(data)

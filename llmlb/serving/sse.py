"""Server-sent events framing: one ``data:`` line per chunk, errors as a ``data: {"error"}``
event, always ending with ``data: [DONE]``; and the named events (``event:`` and ``data:``
lines) of the Responses and Messages APIs; and the reading of an upstream's events
(``data_of``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator

from .. import errors

log = logging.getLogger(__name__)


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def named_event(name: str, payload: dict) -> str:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n"


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


class SSEStream:
    """The body of a streaming response. The WSGI server calls ``close()`` when the request
    ends, also when the client left before the first byte, so ``on_close`` always runs (a
    generator that never started would skip its ``finally``)."""

    def __init__(self, chunks: Iterable[dict], on_close: Callable[[], None],
                 usage: Callable[[], dict] | None = None) -> None:
        self._chunks, self._on_close = chunks, on_close
        self.usage = usage  # the token counts so far (the prompt's, once it is read)

    def __iter__(self) -> Iterator[str]:
        return _frames(self._chunks)

    def chunks(self) -> Iterable[dict]:
        """The chunks before framing, for a dialect that frames them its own way."""
        return self._chunks

    def close(self) -> None:
        self._on_close()


def _frames(chunks: Iterable[dict]) -> Iterator[str]:
    try:
        for chunk in chunks:
            yield event(chunk)
    except errors.APIError as exc:
        yield event(exc.body())
    except GeneratorExit:
        raise
    except Exception as exc:  # headers are sent: the error can only travel as an event
        log.exception("Stream failed")
        err = errors.from_exception(exc)
        yield event(err.body())
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    yield "data: [DONE]\n\n"


class EventStream(SSEStream):
    """A stream whose frames are already made (a dialect's named events); closing it closes
    what it was made from."""

    def __init__(self, frames: Iterable[str], on_close: Callable[[], None]) -> None:
        super().__init__((), on_close)
        self._frames = frames

    def __iter__(self) -> Iterator[str]:
        return iter(self._frames)

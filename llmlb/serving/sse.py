"""Server-sent events framing: one ``data:`` line per chunk, errors as a ``data: {"error"}``
event, always ending with ``data: [DONE]``; and a stream of frames already made (the named
events of the Responses and Messages APIs, ``EventStream``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from .. import errors
from ..wire import DONE, event

log = logging.getLogger(__name__)


class SSEStream:
    """The body of a streaming response. The WSGI server calls ``close()`` when the request
    ends, also when the client left before the first byte, so ``on_close`` always runs (a
    generator that never started would skip its ``finally``)."""

    def __init__(self, chunks: Iterable[dict], on_close: Callable[[], None],
                 usage: Callable[[], dict] | None = None) -> None:
        self._chunks, self._on_close = chunks, on_close
        self.usage = usage  # the token counts so far (the prompt's, once it is read)

    def __iter__(self) -> Iterator[str | bytes]:
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
    yield DONE


class EventStream(SSEStream):
    """A stream whose frames are already made (a dialect's named events); closing it closes
    what it was made from."""

    def __init__(self, frames: Iterable[str | bytes], on_close: Callable[[], None]) -> None:
        super().__init__((), on_close)
        self._frames = frames

    def __iter__(self) -> Iterator[str | bytes]:
        return iter(self._frames)

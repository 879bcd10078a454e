"""``ModelStatusChanged`` events for WebSocket clients (HB-4), from any worker or node.

Each process runs one watcher thread (while it has subscribers) that compares the hub's
derived snapshot every ``interval`` seconds and fans the differences out to its subscribers.
Because the snapshot is read from the shared state (files, locks, progress records, the
database), a download run by another worker or node is seen as well as one run here;
progress is reported in whole-percent steps, not per chunk.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Snapshot = dict[str, tuple[str, int | None]]


def changes(before: Snapshot, after: Snapshot) -> list[dict]:
    events = []
    for model_id, (status, pct) in after.items():
        if before.get(model_id) != (status, pct):
            event = {"type": "ModelStatusChanged", "model_id": model_id, "status": status}
            if pct is not None:
                event["progress"] = pct / 100
            events.append(event)
    return events


class StatusEvents:
    def __init__(self, snapshot: Callable[[], Snapshot], interval: float = 0.2) -> None:
        self._snapshot, self._interval = snapshot, interval
        self._subscribers: set[queue.Queue] = set()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=1000)
        with self._mutex:
            self._subscribers.add(q)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="llmlb-status-events")
                self._thread.start()
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._mutex:
            self._subscribers.discard(q)

    def poke(self) -> None:
        """Look now (a download of this process reported something)."""
        self._wake.set()

    def _watch(self) -> None:
        try:
            previous = self._snapshot()
        except Exception:
            log.exception("Model status snapshot failed")
            previous = {}
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            with self._mutex:
                if not self._subscribers:
                    self._thread = None
                    return
                subscribers = list(self._subscribers)
            try:
                current = self._snapshot()
            except Exception:  # a bad moment (a file half-written) must not end the stream
                log.exception("Model status snapshot failed")
                continue
            for event in changes(previous, current):
                for q in subscribers:
                    # A client that does not read loses events rather than hold others up.
                    with contextlib.suppress(queue.Full):
                        q.put_nowait(event)
            previous = current

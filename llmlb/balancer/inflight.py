"""Requests in flight per node, counted across every worker process without a write to SQLite
per request: a small memory-mapped file next to the database.

The file holds one slot per worker process (its pid) and, per node, one counter per slot, laid
out node-major so that a node's total is the sum of one contiguous run of integers. A worker
writes only its own slot (under a thread lock: its threads share it); readers sum. Workers
claim the lowest free slot and the header keeps how many slots were ever claimed, so a reader
sums that many (two, for two workers), not all ``WORKERS``: a request reads a node's load up to
three times. A slot whose
process died is cleared when a new worker claims a slot and by the supervisor's sweep, so a
crashed worker's requests stop counting within a sweep.

Nodes are mapped to counters by their registry id modulo ``NODES`` (the in-process node is 0);
two nodes sharing a counter only blur their load figures, they are never mixed up otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import os_lock, process_id

MAGIC = b"LLMLBIF2"  # 2: the count of slots claimed, at _USED_AT
WORKERS = 128  # worker processes of one instance that can count at once
NODES = 512
_HEADER = struct.Struct("<8sII")
_USED_AT = _HEADER.size  # an int: how many slots were ever claimed (the highest + 1)
_PIDS_AT = 64
_COUNTS_AT = _PIDS_AT + 8 * WORKERS
SIZE = _COUNTS_AT + 4 * WORKERS * NODES


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InflightCounters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = os_lock.lock()  # around the mmap's counters only: never waits
        self._attach_lock = threading.Lock()
        self._pid = -1
        self._slot = -1
        self._map: mmap.mmap | None = None
        self._pids: memoryview | None = None
        self._counts: memoryview | None = None
        self._used: memoryview | None = None

    # --- writers: this worker's slot --------------------------------------------------------

    def enter(self, node: int) -> None:
        with self._lock:
            counts, slot = self._mine()
            counts[(node % NODES) * WORKERS + slot] += 1

    def leave(self, node: int) -> None:
        with self._lock:
            counts, slot = self._mine()
            i = (node % NODES) * WORKERS + slot
            if counts[i] > 0:
                counts[i] -= 1

    # --- readers ------------------------------------------------------------------------------

    def load(self, node: int) -> int:
        """Requests in flight to ``node`` from every worker of this instance."""
        counts = self._view()[1]
        start = (node % NODES) * WORKERS
        assert self._used is not None
        return max(0, sum(counts[start:start + self._used[0]]))

    def sweep(self) -> int:
        """Clear the slots of processes that died; returns how many were cleared."""
        self._view()
        cleared = 0
        with self._file_lock():
            assert self._pids is not None
            for slot in range(WORKERS):
                pid = self._pids[slot]
                if pid and not _alive(pid):
                    self._clear(slot)
                    cleared += 1
        return cleared

    def close(self) -> None:
        with self._lock:
            if self._map is not None and self._pid == os.getpid() and self._slot >= 0:
                with self._file_lock():
                    self._clear(self._slot)
            views = (self._pids, self._counts, self._used)
            self._counts, self._pids, self._used = None, None, None
            # A request still finishing elsewhere may hold a slice: the map then goes with
            # the process instead.
            with contextlib.suppress(BufferError, ValueError):
                for view in views:
                    if view is not None:
                        view.release()
                if self._map is not None:
                    self._map.close()
            self._map = None
            self._pid, self._slot = -1, -1

    # --- internals ----------------------------------------------------------------------------

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Between processes: claiming, clearing and (re)creating slots."""
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _view(self) -> tuple[memoryview, memoryview]:
        pids, counts = self._pids, self._counts
        if pids is None or counts is None:
            with self._attach_lock:  # the first use may come from several threads at once
                if self._counts is None:
                    self._attach()
            pids, counts = self._pids, self._counts
            assert pids is not None and counts is not None
        return pids, counts

    def _attach(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock():
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                header = os.pread(fd, _HEADER.size, 0)
                if len(header) < _HEADER.size or _HEADER.unpack(header) != (MAGIC, WORKERS,
                                                                              NODES):
                    os.ftruncate(fd, 0)  # new, or written by a build with another layout
                    os.ftruncate(fd, SIZE)
                    os.pwrite(fd, _HEADER.pack(MAGIC, WORKERS, NODES), 0)
                self._map = mmap.mmap(fd, SIZE)
            finally:
                os.close(fd)
        self._pids = memoryview(self._map)[_PIDS_AT:_COUNTS_AT].cast("q")
        self._used = memoryview(self._map)[_USED_AT:_USED_AT + 4].cast("i")
        self._counts = memoryview(self._map)[_COUNTS_AT:SIZE].cast("i")  # set last: "ready"

    def _mine(self) -> tuple[memoryview, int]:
        """This process's counters and slot, claiming a slot after start or fork."""
        pids, counts = self._view()
        pid = process_id.current()
        if self._pid != pid:
            with self._file_lock():
                free = [s for s in range(WORKERS) if pids[s] == pid]
                free = free or [s for s in range(WORKERS) if not pids[s] or not _alive(pids[s])]
                if not free:
                    raise RuntimeError(f"more than {WORKERS} worker processes count requests "
                                       f"in {self.path}")
                self._slot = free[0]
                self._clear(self._slot)
                pids[self._slot] = pid
                assert self._used is not None
                self._used[0] = max(self._used[0], self._slot + 1)
            self._pid = pid
        return counts, self._slot

    def _clear(self, slot: int) -> None:
        assert self._pids is not None and self._counts is not None
        for node in range(NODES):
            self._counts[node * WORKERS + slot] = 0
        self._pids[slot] = 0

"""Where each recent prompt prefix was served, shared by every worker of a balancer: a small
memory-mapped hash table next to the database (``<database>.prefixes``), read and written
without locks on the request path.

The table has ``BUCKETS`` buckets of ``WAYS`` entries; an entry is two 64-bit words, the
prefix's key (``routing.prefix_of``; 0 is an empty entry) and the member's id with the time it
was served and 8 bits of the key. A key lives in the bucket its low bits name; recording it
overwrites its own entry, else an empty or the oldest one of the bucket (a bounded record: the
least recently served prefixes go first). Entries older than ``RECENT_SECONDS`` are ignored.

No lock: each word is written and read whole (aligned 8-byte accesses), and a reader that
meets an entry half written by another process (a new key beside the old value) sees that
the value's 8 key bits do not match and treats it as empty. The worst a race can do is route
one request as if nothing were warm. Creating or resetting the file (a new layout) happens
under an ``fcntl`` lock, as for the in-flight counters.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

MAGIC = b"LLMLBPX1"
BUCKETS = 1 << 15
WAYS = 4
RECENT_SECONDS = 1800  # a prefix served longer ago is likely gone from the member's cache
_HEADER = struct.Struct("<8sII")
_DATA_AT = 64
_ENTRY = 16
_BUCKET = struct.Struct(f"<{2 * WAYS}Q")
SIZE = _DATA_AT + BUCKETS * WAYS * _ENTRY
_WORD = struct.Struct("<Q")
_TIME_MASK = (1 << 24) - 1  # seconds, modulo ~194 days: only ages up to RECENT_SECONDS matter


def _value(member: int, now: int, key: int) -> int:
    return (member & 0xFFFFFFFF) | (now & _TIME_MASK) << 32 | (key >> 56) << 56


def _age(value: int, clock: int) -> int:
    return (clock - (value >> 32)) & _TIME_MASK


def _victim(words: tuple[int, ...], clock: int) -> int:
    """The way to overwrite: an empty one, else the one served longest ago."""
    oldest, age = 0, -1
    for way in range(WAYS):
        if not words[2 * way]:
            return way
        if _age(words[2 * way + 1], clock) > age:
            oldest, age = way, _age(words[2 * way + 1], clock)
    return oldest


class PrefixRecord:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def where(self, keys: Sequence[int], now: float | None = None) -> list[int | None]:
        """For each key, the member that last served it recently, or None."""
        table = self._table()
        clock = int(time.time() if now is None else now)
        out: list[int | None] = []
        for key in keys:
            words = _BUCKET.unpack_from(table, _DATA_AT + (key % BUCKETS) * WAYS * _ENTRY)
            found = None
            for way in range(0, 2 * WAYS, 2):
                if words[way] == key:
                    value = words[way + 1]
                    if value >> 56 == key >> 56 and _age(value, clock) <= RECENT_SECONDS:
                        found = value & 0xFFFFFFFF
                    break
            out.append(found)
        return out

    def record(self, keys: Sequence[int], member: int, now: float | None = None) -> None:
        """``member`` served a request with these prefixes."""
        table = self._table()
        clock = int(time.time() if now is None else now)
        for key in keys:
            at = _DATA_AT + (key % BUCKETS) * WAYS * _ENTRY
            words = _BUCKET.unpack_from(table, at)
            way = next((w for w in range(WAYS) if words[2 * w] == key), None)
            if way is None:
                way = _victim(words, clock)
                _WORD.pack_into(table, at + way * _ENTRY, key)
            _WORD.pack_into(table, at + way * _ENTRY + 8, _value(member, clock, key))

    def _table(self) -> mmap.mmap:
        table = self._map
        if table is None:
            with self._lock:  # the first use may come from several threads at once
                if self._map is None:
                    self._map = self._attach()
                table = self._map
        return table

    def _attach(self) -> mmap.mmap:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT,
                       0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size < SIZE:
                    os.ftruncate(fd, SIZE)  # grown, never shrunk: another process maps it
                header = os.pread(fd, _HEADER.size, 0)
                if size and _HEADER.unpack(header) != (MAGIC, BUCKETS, WAYS):
                    # New, or written by a build with another layout: start empty.
                    zeros = bytes(1 << 20)
                    for at in range(_DATA_AT, SIZE, len(zeros)):
                        os.pwrite(fd, zeros[:SIZE - at], at)
                if _HEADER.unpack(header) != (MAGIC, BUCKETS, WAYS):
                    os.pwrite(fd, _HEADER.pack(MAGIC, BUCKETS, WAYS), 0)
                return mmap.mmap(fd, SIZE)
            finally:
                os.close(fd)
        finally:
            os.close(lock)

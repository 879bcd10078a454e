"""Exclusive locks on files: one per download under ``models_dir/.locks/`` (RS-5), the
supervisor's leader lock and the database's setup lock on one host (``state/sqlite.py``).

``flock`` makes them exclusive between processes, including gunicorn workers and nodes that
share the directory, and the kernel drops them when a process dies, so a killed download (or
a killed leader) never leaves a lock behind. A per-path threading lock on top makes them
exclusive between threads of one process too (on NFS, Linux emulates flock with per-process
POSIX locks).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

_thread_locks: dict[str, threading.Lock] = {}
_registry_lock = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _registry_lock:
        return _thread_locks.setdefault(str(path), threading.Lock())


class FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = _thread_lock(path)
        self._fd: int | None = None

    def try_acquire(self, record_owner: bool = True) -> bool:
        if not self._thread_lock.acquire(blocking=False):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._thread_lock.release()
                return False
        except BaseException:
            self._thread_lock.release()
            raise
        self._fd = fd
        if record_owner:  # for operators looking at .locks/: who downloads this
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        return True

    def acquire(self, timeout: float | None = None, poll: float = 0.2) -> bool:
        """Wait for the lock (polling, so waiting threads stay interruptible)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._thread_lock.release()

    def held_elsewhere(self) -> bool:
        """Whether another thread, process or node holds the lock right now."""
        if self.try_acquire(record_owner=False):
            self.release()
            return False
        return True

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLeaderLock:
    """The leader lock on one host: ``flock`` on a file, dropped by the kernel when the
    holder dies."""

    def __init__(self, path: Path) -> None:
        self._lock = FileLock(path)
        self._held = False

    def try_acquire(self) -> bool:
        self._held = self._held or self._lock.try_acquire()
        return self._held

    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

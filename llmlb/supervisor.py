"""Periodic work of one llmlb instance, in one home: named tasks (a node's heartbeat, resuming
pulls, clearing dead workers' counters, watching node status) run by exactly one process.

Every gunicorn worker builds a ``Supervisor``; the one whose ``flock`` on the instance's lock
file (next to its database) succeeds becomes the leader and runs the tasks, each on its own
thread so that a slow one (a balancer that does not answer) never delays the others. The
others keep trying the lock, so when the leader dies (the kernel drops its lock) another
worker takes over within ``retry_seconds``. Results that other workers need go where every
worker reads them (SQLite, files), never into the leader's memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    interval: float
    run: Callable[[], None]
    wake: threading.Event = field(default_factory=threading.Event)
    runs: int = 0
    last_run: float | None = None
    last_error: str | None = None


class Supervisor:
    def __init__(self, lock_path: Path, retry_seconds: float = 1.0) -> None:
        self.lock_path = lock_path
        self.retry_seconds = retry_seconds
        self.tasks: dict[str, Task] = {}
        self._stop = threading.Event()
        self._fd: int | None = None
        self._threads: list[threading.Thread] = []
        self._started = False

    @property
    def leader(self) -> bool:
        return self._fd is not None

    def add(self, name: str, interval: float, run: Callable[[], None]) -> None:
        """Run ``run()`` every ``interval`` seconds (and when woken) while this is the leader."""
        if self._started:
            raise RuntimeError("add tasks before start()")
        self.tasks[name] = Task(name, max(0.05, interval), run)

    def wake(self, name: str) -> None:
        """Run a task now rather than at its next interval (no-op where it does not run)."""
        task = self.tasks.get(name)
        if task is not None:
            task.wake.set()

    def start(self) -> None:
        if self._started or not self.tasks:
            return
        self._started = True
        thread = threading.Thread(target=self._campaign, name="llmlb-supervisor", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for task in self.tasks.values():
            task.wake.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock

    def describe(self) -> dict:
        return {"leader": self.leader, "pid": os.getpid(),
                "tasks": {t.name: {"interval": t.interval, "runs": t.runs,
                                   "last_run": t.last_run, "last_error": t.last_error}
                          for t in self.tasks.values()}}

    # --- internals ---------------------------------------------------------------------------

    def _try_lead(self) -> bool:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for operators: who runs the tasks
        self._fd = fd
        return True

    def _campaign(self) -> None:
        while not self._stop.is_set():
            try:
                if self._try_lead():
                    break
            except OSError as exc:
                log.warning("Supervisor lock %s unusable: %s", self.lock_path, exc)
            self._stop.wait(self.retry_seconds)
        if self._stop.is_set():
            return
        log.debug("Supervisor leader is process %d: %s", os.getpid(), ", ".join(self.tasks))
        for task in self.tasks.values():
            thread = threading.Thread(target=self._loop, args=(task,), daemon=True,
                                      name=f"llmlb-task-{task.name}")
            thread.start()
            self._threads.append(thread)

    def _loop(self, task: Task) -> None:
        while not self._stop.is_set():
            task.wake.clear()
            try:
                task.run()
                if task.last_error is not None:
                    log.info("Task %s works again", task.name)
                task.last_error = None
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                if message != task.last_error:  # once per distinct failure, not every tick
                    if isinstance(exc, OSError):  # the network, a peer: no traceback needed
                        log.warning("Task %s failed: %s", task.name, exc)
                    else:
                        log.exception("Task %s failed", task.name)
                task.last_error = message
            task.runs += 1
            task.last_run = time.time()
            task.wake.wait(task.interval)

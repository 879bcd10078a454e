"""Periodic work, in one home: named tasks (a node's heartbeat, resuming pulls, clearing dead
workers' counters, watching node status, checking endpoints) run by exactly one process.

Every gunicorn worker builds its supervisors; the one that gets a supervisor's leader lock
runs its tasks, each on its own thread so that a slow one (a balancer that does not answer)
never delays the others. Work of one host holds a ``flock`` next to the database; work of
the whole cluster holds the state's lock (``State.leader_lock``: the same kind of file lock
on SQLite, an advisory lock on PostgreSQL, so one balancer of all runs it). The others keep
trying the lock, so when the leader dies (the kernel, or PostgreSQL, drops its lock) another
worker takes over within ``retry_seconds``; a leader that loses its lock (its database
connection cut) pauses its tasks until it wins it again. Results that other workers need go
where every worker reads them (the database, files), never into the leader's memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .locks import FileLeaderLock
from .state import LeaderLock, StateUnavailable

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
    def __init__(self, lock: LeaderLock | Path, retry_seconds: float = 1.0) -> None:
        """``lock``: the leader lock, or the path of a file to ``flock``."""
        self.lock = FileLeaderLock(lock) if isinstance(lock, Path) else lock
        self.retry_seconds = retry_seconds
        self.tasks: dict[str, Task] = {}
        self._stop = threading.Event()
        self._leading = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False

    @property
    def leader(self) -> bool:
        return self._leading.is_set()

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
        self._leading.set()  # wakes the task threads, which then see the stop
        for task in self.tasks.values():
            task.wake.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._leading.clear()
        self.lock.release()

    def describe(self) -> dict:
        return {"leader": self.leader, "pid": os.getpid(),
                "tasks": {t.name: {"interval": t.interval, "runs": t.runs,
                                   "last_run": t.last_run, "last_error": t.last_error}
                          for t in self.tasks.values()}}

    # --- internals ---------------------------------------------------------------------------

    def _campaign(self) -> None:
        """Win the lock (trying every ``retry_seconds``), start the tasks, and check that the
        lock stays ours; pause the tasks while it is not."""
        while not self._stop.is_set():
            try:
                ours = self.lock.held() if self.leader else self.lock.try_acquire()
            except OSError as exc:
                log.warning("Supervisor lock unusable: %s", exc)
                ours = False
            if ours and not self.leader:
                log.debug("Supervisor leader is process %d: %s", os.getpid(),
                          ", ".join(self.tasks))
                self._leading.set()
                if not self._threads[1:]:
                    for task in self.tasks.values():
                        thread = threading.Thread(target=self._loop, args=(task,),
                                                  daemon=True, name=f"llmlb-task-{task.name}")
                        thread.start()
                        self._threads.append(thread)
            elif not ours and self.leader:
                log.warning("Process %d lost the supervisor lock: its tasks pause",
                            os.getpid())
                self._leading.clear()
            self._stop.wait(self.retry_seconds)

    def _loop(self, task: Task) -> None:
        while not self._stop.is_set():
            self._leading.wait()
            if self._stop.is_set():
                return
            task.wake.clear()
            try:
                task.run()
                if task.last_error is not None:
                    log.info("Task %s works again", task.name)
                task.last_error = None
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                if message != task.last_error:  # once per distinct failure, not every tick
                    # The network, a peer, the database away: no traceback needed.
                    if isinstance(exc, OSError | StateUnavailable):
                        log.warning("Task %s failed: %s", task.name, exc)
                    else:
                        log.exception("Task %s failed", task.name)
                task.last_error = message
            task.runs += 1
            task.last_run = time.time()
            task.wake.wait(task.interval)

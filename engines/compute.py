"""The compute thread: one long-lived thread per process runs every engine's heavy work, and
the models loaded in the process share it by taking turns in bounded steps.

Why one thread. llama.cpp (built with OpenMP) and torch keep a team of OpenMP helper threads
for every thread that calls them. A server that computes on whichever request thread comes
along collects teams until there are more OpenMP threads than cores; libgomp then parks its
threads between steps instead of spinning, and generation runs at half speed (measured: 0.48
of calling llama.cpp directly, bench/RESULTS.md). One calling thread keeps one team per
library per process.

Why steps. With one thread, a model that computes for long (a long prompt, a big batch)
would stall every other model. So work comes in two kinds:

* **tasks** (``call``, ``submit``): run once from start to end; for things that cannot be
  cut up (loading a model, an embeddings call).
* **runners** (``Runner``): objects whose ``step()`` does one bounded piece of work (one
  batched decoding step plus at most a chunk of prompt) and says whether more is pending.
  ``Runner.wake()`` puts a runner in line when it gets new work.

Between two runner steps the thread runs one task, if any. The next step goes to the runner
that has used the least compute time so far (fair shares of time, as Linux's CFS gives
processes), so a model reading a long prompt in chunks and a model decoding short steps each
get half the thread: the second takes several steps for each chunk of the first, and a long
prompt delays another model's tokens by about one chunk, never by the whole prompt. ``stream``
turns any generator into a runner (one item per step); a generator may yield ``None`` to hand
the thread back between pieces of work (prompt chunks), and those ``None`` never reach the
caller.

Plugins that compute on this machine should use these functions too (``engines.base``
re-exports them), or their libraries collect thread teams of their own.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runner(ABC):
    """Work that shares the compute thread in bounded steps (see the module docstring)."""

    @abstractmethod
    def step(self) -> bool:
        """Do one bounded piece of work on the compute thread; True if more is pending."""

    def wake(self) -> None:
        """Ask for a turn: call after giving this runner new work (from any thread)."""
        _scheduler().schedule(self)

    def abort(self, exc: BaseException) -> None:  # noqa: B027 - optional hook
        """``step`` raised: end every request this runner holds with an error, so that none
        waits forever. Called on the compute thread."""


class _Scheduler:
    """Tasks in arrival order, one between two runner steps; runners by fair share of time:
    the next step goes to the runnable runner that has used the least compute time (its
    virtual time, as in Linux's CFS). A runner with long steps (a prompt chunk) therefore
    lets one with short steps (decoding) take several turns in its place, and a runner that
    wakes up starts level with the others instead of with credit for its idle time."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._tasks: deque[tuple[Callable[[], Any], Future]] = deque()
        self._ready: dict[int, Runner] = {}
        self._floor = 0.0  # the virtual time of the least-served runner lately
        self.ident: int | None = None
        threading.Thread(target=self._loop, name="llmlb-compute", daemon=True).start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._cv:
            self._tasks.append((fn, future))
            self._cv.notify()
        return future

    def schedule(self, runner: Runner) -> None:
        with self._cv:
            if id(runner) not in self._ready:
                used = getattr(runner, "_compute_used", None)
                if used is None or used < self._floor:
                    runner._compute_used = self._floor  # type: ignore[attr-defined]
                self._ready[id(runner)] = runner
                self._cv.notify()

    def contended(self) -> bool:
        """Whether other work waits for the thread (runners may then take smaller steps)."""
        return bool(self._tasks or self._ready)

    def _loop(self) -> None:
        self.ident = threading.get_ident()
        while True:
            with self._cv:
                while not self._tasks and not self._ready:
                    self._cv.wait()
                task = self._tasks.popleft() if self._tasks else None
                runner = min(self._ready.values(), key=_used) if self._ready else None
                if runner is not None:
                    del self._ready[id(runner)]
            if task is not None:
                fn, future = task
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            if runner is not None:
                self._step(runner)

    def _step(self, runner: Runner) -> None:
        started = time.perf_counter()
        try:
            more = runner.step()
        except Exception as exc:  # a runner's own errors belong to its requests
            log.exception("Compute runner %r failed", runner)
            more = False
            try:
                runner.abort(exc)
            except Exception:
                log.exception("Compute runner %r failed to abort", runner)
        used = _used(runner) + time.perf_counter() - started
        runner._compute_used = used  # type: ignore[attr-defined]
        with self._cv:
            self._floor = max(self._floor, min(map(_used, [runner, *self._ready.values()])))
        if more:
            self.schedule(runner)


def _used(runner: Runner) -> float:
    return getattr(runner, "_compute_used", 0.0)


_lock = threading.Lock()
_instance: _Scheduler | None = None


def _reset_after_fork() -> None:
    global _instance
    _instance = None  # the thread did not survive the fork; the child starts its own


os.register_at_fork(after_in_child=_reset_after_fork)


def _scheduler() -> _Scheduler:
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                _instance = _Scheduler()
    return _instance


def on_compute_thread() -> bool:
    instance = _instance
    return instance is not None and threading.get_ident() == instance.ident


def contended() -> bool:
    """Whether other work waits for the compute thread right now."""
    return _scheduler().contended()


def submit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Run ``fn`` on the compute thread as one task; its Future holds the result."""
    return _scheduler().submit(lambda: fn(*args, **kwargs))


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the compute thread and return its result (inline when already there)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


_ITEM, _ERROR, _END = 0, 1, 2


class _GeneratorRunner(Runner):
    """Steps a generator on the compute thread, one item per turn."""

    def __init__(self, make: Callable[[], Iterator[T | None]]) -> None:
        self._make = make
        self._source: Iterator[T | None] | None = None
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self._done = False

    def step(self) -> bool:
        if self._done:
            return False
        if self.cancelled:
            self._finish()
            return False
        try:
            if self._source is None:
                self._source = self._make()
            item = next(self._source)
        except StopIteration:
            self.items.put((_END, None))
            self._finish()
            return False
        except BaseException as exc:  # handed to the consumer, which raises it
            self.items.put((_ERROR, exc))
            self._finish()
            return False
        if item is not None:
            self.items.put((_ITEM, item))
        return True

    def _finish(self) -> None:
        self._done = True
        close = getattr(self._source, "close", None)
        if close is not None:
            close()  # on the compute thread: generators hold library state


class Stream(Iterator[T]):
    """The caller's side of ``stream``: iterate for the items; ``close()`` stops the work at
    the next step boundary, also when iteration never began."""

    def __init__(self, runner: _GeneratorRunner) -> None:
        self._runner = runner
        self._closed = False

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        kind, value = self._runner.items.get()
        if kind == _ITEM:
            return value
        self._closed = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._runner.cancelled = True
            self._runner.wake()  # so that it closes its generator now, not at unload


def stream(make: Callable[[], Iterator[T | None]]) -> Iterator[T]:
    """Iterate ``make()`` on the compute thread, one item per turn; yield its items (not its
    ``None``s) to the calling thread as they come. The work starts at once."""
    if on_compute_thread():
        return (item for item in make() if item is not None)
    runner = _GeneratorRunner(make)
    runner.wake()
    return Stream(runner)

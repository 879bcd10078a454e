"""One long-lived thread per process for the engines' heavy work.

llama.cpp (built with OpenMP) and torch keep a team of OpenMP helper threads for every thread
that calls them. A server that computes on whichever request thread comes along collects
teams until there are more OpenMP threads than cores; libgomp then parks its threads between
steps instead of spinning, and generation runs at half speed (measured: 0.48 of calling
llama.cpp directly, bench/RESULTS.md). Running all model compute on this one thread keeps one
team per process. Work from different models queues here, which on a CPU is no loss: they
would compete for the same cores anyway.

``call`` runs a function here and waits; ``stream`` iterates a generator here and hands its
items to the caller as they come; ``submit`` starts a function here without waiting.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _reset_after_fork() -> None:
    global _executor, _thread_ident
    _executor, _thread_ident = None, None


os.register_at_fork(after_in_child=_reset_after_fork)


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmlb-compute",
                                               initializer=_remember_thread)
    return _executor


def _remember_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def on_compute_thread() -> bool:
    return threading.get_ident() == _thread_ident


def submit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    return _pool().submit(fn, *args, **kwargs)


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the compute thread and return its result (inline when already there)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


_ITEM, _ERROR, _END = 0, 1, 2


def stream(make: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Iterate ``make()`` on the compute thread; yield its items in the calling thread.

    Closing the returned generator (a client that went away) stops the work after the item
    in progress.
    """
    if on_compute_thread():
        yield from make()
        return
    items: queue.SimpleQueue = queue.SimpleQueue()
    cancelled = threading.Event()

    def produce() -> None:
        source = None
        try:
            source = make()
            for item in source:
                items.put((_ITEM, item))
                if cancelled.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, which raises it
            items.put((_ERROR, exc))
            return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        items.put((_END, None))

    submit(produce)
    try:
        while True:
            kind, value = items.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        cancelled.set()

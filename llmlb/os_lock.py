"""A lock of the operating system for the short sections of the hot path, in gevent workers too.

In a gevent worker ``threading.Lock`` is gevent's (gunicorn patches ``threading`` before the app
loads): a lock written in Python that costs about a microsecond to take, and a proxied request
took fourteen (bench/RESULTS.md): its key, the aliases and the members through the state's
cache, the in-flight counters, and prometheus_client's values (now held, ``metrics.py``). A
section that never gives gevent's hub a turn (no socket, no sleep, no waiting on another
greenlet: a dict, an mmap, SQLite's C library) runs to its end before any other greenlet of
its thread runs, so no second greenlet can find it held. The operating system's lock then
guards it as well, against the threads of a gthread worker as before, for a fraction of the
cost.

Only for such sections: a greenlet that waits on an OS lock held by another greenlet of its own
thread blocks the thread, and so both, for good. A section that may wait (a PostgreSQL query, a
network call) keeps ``threading.Lock``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any


def lock() -> Any:
    """A new unlocked lock of the operating system, whether or not gevent patched threading."""
    return _original("allocate_lock", threading.Lock)()


def rlock() -> Any:
    """The same, reentrant (a ``logging.Handler``'s lock)."""
    return _original("RLock", threading.RLock)()


def _original(name: str, default: Any) -> Any:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        return monkey.get_original("_thread", name)
    return default

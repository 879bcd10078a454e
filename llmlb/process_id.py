"""This process's id, without a system call each time it is asked.

glibc stopped caching ``getpid()`` (2.25), so ``os.getpid()`` is a system call; the hot path
asks for it about ten times a request (each prometheus value checks that it was not forked,
the in-flight counters find their slot). The id is kept here and renewed in the child at
every ``fork`` (``os.register_at_fork``), which is the only way it changes.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current() -> int:
    """``os.getpid()``, as of the last fork."""
    return _pid

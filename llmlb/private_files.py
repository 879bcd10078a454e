"""File modes of llmlb's state (SC-4): ``$LLMLB_HOME`` is 0700, the SQLite database and its
``-wal``/``-shm`` files 0600, because the database holds the key that signs dashboard sessions
(anyone who reads it can forge an admin login); so is ``endpoints.key``, which decrypts the
endpoints' API keys.

New files get their mode at creation, never through the process umask (a process-wide setting
that would race with other threads creating files). An existing install with looser modes is
tightened at start, with a warning; what cannot be changed (a directory someone else owns, a
shared one such as /tmp) is reported loudly and left alone.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm")


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700, or tighten an existing one."""
    if not path.exists():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode passes through the umask
        return
    _tighten(path, DIR_MODE)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists; tighten it when it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        _tighten(path, FILE_MODE)
        return
    os.fchmod(fd, FILE_MODE)
    os.close(fd)


def private_existing(path: Path) -> None:
    """A secret file llmlb made earlier (``endpoints.key``): tightened to 0600 when it is
    looser, left alone when it does not exist (it is created on first use, 0600)."""
    _tighten(path, FILE_MODE)


def private_database(path: Path) -> None:
    """The database file before SQLite opens it: SQLite gives the ``-wal`` and ``-shm`` files
    it creates the database file's mode, so 0600 here is 0600 for all three."""
    private_file(path)
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            _tighten(companion, FILE_MODE)


def _tighten(path: Path, wanted: int) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & ~wanted & 0o077:
        return  # nobody but the owner has access
    what = f"{path} is readable or writable by other users (mode {mode:04o})"
    if st.st_uid != os.geteuid() or mode & stat.S_ISVTX:
        log.error("%s and is not llmlb's own to change: fix it by hand (chmod %04o), it holds "
                  "llmlb's secrets", what, wanted)
        return
    try:
        os.chmod(path, mode & ~0o077)
    except OSError as exc:
        log.error("%s and cannot be changed (%s): fix it by hand (chmod %04o)", what,
                  exc.strerror or exc, wanted)
        return
    log.warning("%s; changed it to %04o", what, mode & ~0o077)

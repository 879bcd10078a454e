"""llmlb's state is its owner's alone (SC-4): the database holds the key that signs dashboard
sessions, so another local user who could read it could forge an admin login."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import llmlb_command


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(home: Path) -> list[Path]:
    return [home / name for name in ("llmlb.db", "llmlb.db-wal", "llmlb.db-shm")]


def test_a_new_home_and_database_are_private(tmp_path: Path, make_server) -> None:
    home = tmp_path / "fresh" / "llmlb"
    # The first thing a user runs, with the usual umask that makes files world-readable.
    subprocess.run([*llmlb_command(), "keys", "create", "--name", "first", "--home", str(home)],
                   check=True, capture_output=True, preexec_fn=lambda: os.umask(0o022))
    assert mode(home) == 0o700
    assert mode(home / "llmlb.db") == 0o600

    old = os.umask(0o022)
    try:
        server = make_server(home=tmp_path / "second", dev=False)
    finally:
        os.umask(old)
    home = server.runtime.settings.home
    assert mode(home) == 0o700
    for path in database_files(home):  # WAL mode: -wal and -shm exist while it runs
        assert mode(path) == 0o600, path


def test_loose_modes_of_an_existing_install_are_tightened(llmlb_home: Path, make_server,
                                                          caplog: pytest.LogCaptureFixture,
                                                          ) -> None:
    make_server(dev=False).stop()
    os.chmod(llmlb_home, 0o755)
    for path in database_files(llmlb_home):
        if not path.exists():
            path.touch()
        os.chmod(path, 0o644)
    make_server(dev=False)
    assert mode(llmlb_home) == 0o700
    for path in database_files(llmlb_home):
        assert mode(path) == 0o600, path
    warnings = [r.getMessage() for r in caplog.records if "readable or writable by other users"
                in r.getMessage()]
    assert any(str(llmlb_home / "llmlb.db") in w and "changed it to 0600" in w
               for w in warnings), warnings
    assert any(f"{llmlb_home} is" in w and "changed it to 0700" in w for w in warnings)


def test_a_loose_endpoints_key_is_tightened(llmlb_home: Path, make_server,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The key that decrypts the endpoints' API keys, restored from a backup with the usual
    umask: as private as the database once llmlb starts."""
    from cryptography.fernet import Fernet

    key_file = llmlb_home / "endpoints.key"
    key_file.write_bytes(Fernet.generate_key())
    os.chmod(key_file, 0o644)
    make_server(dev=False)
    assert mode(key_file) == 0o600
    assert any(str(key_file) in r.getMessage() and "changed it to 0600" in r.getMessage()
               for r in caplog.records)

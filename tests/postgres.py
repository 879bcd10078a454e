"""A real PostgreSQL (Debian's ``postgresql`` package) for the tests, started in a temporary
directory and stopped at the end; ``make test`` installs the package.

PostgreSQL refuses to run as root, and CI runs as root: the server then runs as ``nobody``
(``setpriv``), in a directory of its own outside pytest's root-only temporary tree. It listens
on a free port of 127.0.0.1 with ``trust`` authentication (loopback, throw-away data), as the
user ``llmlb``. Each test gets a fresh database of its own (``new_database``), so one cluster
serves the whole session; ``restart``, ``stop`` and ``kill`` let fault tests take it away.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

USER = "llmlb"


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's "
                           "postgresql package (apt-get install postgresql)")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    directory: Path
    port: int
    bindir: Path

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    # --- running it -------------------------------------------------------------------------

    @classmethod
    def start(cls) -> Postgres:
        directory = Path(tempfile.mkdtemp(prefix="llmlb-pg-"))
        pg = cls(directory, _free_port(), _bindir())
        if os.geteuid() == 0:
            shutil.chown(directory, "nobody", "nogroup")
        pg._run("initdb", "-D", str(pg.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                "--no-sync", "--no-instructions")
        pg.start_server()
        return pg

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(self._as_owner([str(self.bindir / tool), *args]),
                                capture_output=True, text=True, cwd=self.directory)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}\n{self._log_tail()}")

    def _options(self) -> str:
        # Throw-away data: no fsync; enough connections for several balancers' pools.
        return (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
                f"{self.directory} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off -c max_connections=300")

    def start_server(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                  "-o", self._options(), "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """``pg_ctl restart``: every connection is cut; the server is back when this returns."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-m", "fast", "-w",
                  "-t", "60", "-o", self._options(), "restart")

    def kill(self) -> None:
        """The server taken away at once, as a crash would (``-m immediate``: no shutdown
        checkpoint; it recovers from its WAL on the next start). A SIGKILL of the postmaster
        would do the same but can leave a zombie holding ``postmaster.pid`` where the
        container's init reaps nothing."""
        self.stop("immediate")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # --- databases ----------------------------------------------------------------------------

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

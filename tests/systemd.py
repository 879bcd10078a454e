"""The shipped systemd units (``deploy/systemd/``), read and run the way systemd would.

``Unit.load`` parses a unit file (repeated keys kept in order); ``for_tests`` points its
install paths (``/opt/llmlb``, its ``.venv``) at this checkout and the running venv, so that
``systemd-analyze verify`` can check the file and a test can start the service's very
``ExecStart`` line with the unit's ``WorkingDirectory`` and environment. Everything else is
as shipped: the tests check the files operators install.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
INSTALL_DIR = "/opt/llmlb"  # where the units expect the checkout (README, "Production")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def for_tests(text: str, venv_bin: Path) -> str:
    """The unit with its install paths pointing at this checkout and venv."""
    if f"{INSTALL_DIR}/.venv/bin/" not in text:
        raise ValueError(f"the unit no longer runs from {INSTALL_DIR}/.venv/bin")
    return text.replace(f"{INSTALL_DIR}/.venv/bin/", f"{venv_bin}/").replace(INSTALL_DIR,
                                                                               str(REPO))


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile reads them (comments and blanks skipped,
    quotes removed)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, _, value = line.partition("=")
        env[name.strip()] = " ".join(shlex.split(value))
    return env


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def load(cls, path: Path, text: str | None = None) -> Unit:
        sections: dict[str, list[tuple[str, str]]] = {}
        current = None
        for line in (text if text is not None else path.read_text()).splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                current = sections.setdefault(line.strip("[]"), [])
            else:
                name, _, value = line.partition("=")
                current.append((name.strip(), value.strip()))
        return cls(path, sections)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, key: str, section: str = "Service") -> str:
        found = self.values(key, section)
        assert len(found) == 1, f"{self.path.name}: {key}= appears {len(found)} times"
        return found[0]

    @property
    def environment(self) -> dict[str, str]:
        """The ``Environment=`` assignments, in order (later ones win, as in systemd)."""
        env = {}
        for line in self.values("Environment"):
            for word in shlex.split(line):
                name, _, value = word.partition("=")
                env[name] = value
        return env

    @property
    def environment_files(self) -> list[tuple[Path, bool]]:
        """Each ``EnvironmentFile=`` and whether it is required (no leading '-')."""
        return [(Path(v.lstrip("-")), not v.startswith("-"))
                for v in self.values("EnvironmentFile")]

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.value("ExecStart"))


def verify(unit_file: Path) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` on one unit file; it prints nothing when all is well."""
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_file)], capture_output=True,
                          text=True, timeout=60)

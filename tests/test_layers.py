"""The layering written down as import-linter contracts (setup.cfg, ``[importlinter]``):
llmlb's layers, a balancer that knows its members only through a protocol, serving free of
the node, engines below llmlb. ``lint-imports`` checks them on this tree."""

from __future__ import annotations

import os
import shutil
import subprocess

from .conftest import REPO, VENV_BIN


def test_the_import_contracts_hold() -> None:
    exe = VENV_BIN / "lint-imports"
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this tree, not an installed copy
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([*command, "--no-cache"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 broken" in report

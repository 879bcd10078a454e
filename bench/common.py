"""Helpers shared by the benchmarks in this folder.

Paths and constants, a clean environment for the processes a benchmark starts, a server process
in its own session (started, waited for until ``GET /health`` answers, stopped by process group),
``tests/fake_hub.py`` as a separate process, figures (nearest-rank percentiles), the measured
commit and machine, the JSON summary saved under ``bench/.work/results/``, and CPU interference
checks on top of ``cpuwatch.py`` (``Monitor``, ``measure_in_stretches``).

The scripts run as ``.venv/bin/python bench/<name>.py``, so this folder is on ``sys.path`` and
they import this module as ``common``. It imports only the standard library and ``cpuwatch`` at
the top; ``requests`` and ``llmlb`` are imported where they are used, so a process that never
needs them (engine_overhead.py's direct workers, hub.py's client) does not load them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from cpuwatch import CpuMonitor, cpu_model

REPO = Path(__file__).resolve().parent.parent
WORK_ROOT = REPO / "bench" / ".work"  # git-ignored; each benchmark works below it
RESULTS = WORK_ROOT / "results"
VENV_BIN = Path(sys.executable).parent
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # nothing may reach the real hub
DEV_API_KEY = "sk_debug"  # the API key with LLMLB_DEV=1
AUTH = {"Authorization": f"Bearer {DEV_API_KEY}"}
MISSING_MODEL = "bench-no-such-model"  # neither on disk nor in any catalog
MISSING_MODEL_CHAT = {"model": MISSING_MODEL, "messages": [{"role": "user", "content": "hi"}]}

T = TypeVar("T")


# --- environment ------------------------------------------------------------------------------

def llmlb_free_environ(*, from_options: bool = True) -> dict[str, str]:
    """This process's environment without llmlb's settings.

    ``from_options=True`` drops exactly the names ``llmlb.config.OPTIONS`` reads (``HF_ENDPOINT``
    among them); that imports llmlb, and with it Flask. ``from_options=False`` drops by name
    without importing llmlb: ``LLMLB_*``, ``XLLM_*``, ``LLM_MODELS_DIR`` and ``HF_TOKEN``
    (``HF_ENDPOINT`` stays)."""
    if from_options:
        from llmlb.config import OPTIONS

        names = {n for o in OPTIONS for n in o.env}
        return {k: v for k, v in os.environ.items() if k not in names}
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LLMLB_", "XLLM_")) and k not in ("LLM_MODELS_DIR", "HF_TOKEN")}


def clean_env(*, from_options: bool = True, **extra: str) -> dict[str, str]:
    """The environment for a child process: ``llmlb_free_environ(from_options=...)``, unbuffered
    Python output, plus ``extra``."""
    return {**llmlb_free_environ(from_options=from_options), "PYTHONUNBUFFERED": "1", **extra}


def hf_quiet_env(hf_home: Path) -> dict[str, str]:
    """Settings for ``huggingface_hub`` (read once, when it is imported): no progress bars, no
    telemetry, and its caches in ``hf_home``."""
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(hf_home)}


# --- processes --------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gunicorn_cmd() -> list[str]:
    """The production server as the README runs it (from the repository root)."""
    return [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]


def llmlb_serve_cmd(port: int) -> list[str]:
    return [str(VENV_BIN / "llmlb"), "serve", "--port", str(port)]


def proc_stat(pid: int) -> tuple[str, int, int, int]:
    """(name, parent pid, user jiffies, system jiffies) of a process, its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2:].split()  # the name may contain spaces
    return stat[stat.find("(") + 1:stat.rfind(")")], int(rest[1]), int(rest[11]), int(rest[12])


def proc_stats() -> dict[int, tuple[str, int, int, int]]:
    """``proc_stat`` of every process that can be read."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(name)] = proc_stat(int(name))
    return out


def children_of(pid: int) -> list[int]:
    """Live child pids of ``pid``, ascending."""
    return sorted(p for p, (_n, ppid, _u, _s) in proc_stats().items() if ppid == pid)


class Proc:
    """A server subprocess, started in the repository root in its own session (so stopping it
    reaches its children). Its output goes to ``log``; with ``stdout_pipe`` its stdout is a
    pipe (``first_line``) and only stderr goes to the log."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path,
                 stdout_pipe: bool = False) -> None:
        self.log = log
        self.popen = subprocess.Popen(
            args, cwd=REPO, env=env, start_new_session=True,
            stdout=subprocess.PIPE if stdout_pipe else log.open("wb"),
            stderr=log.open("ab") if stdout_pipe else subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def first_line(self, timeout: float) -> str:
        """The first line the process prints (with ``stdout_pipe``), waited for up to
        ``timeout`` seconds."""
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"no output in {timeout} s:\n{self.log_text()}")
        line = self.popen.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"process ended:\n{self.log_text()}")
        return line

    def children(self) -> list[int]:
        """Live child pids (gunicorn's workers, ``llmlb serve``'s worker), ascending."""
        return children_of(self.popen.pid)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the process group; SIGKILL if it is still there after ``timeout`` s."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start_server(args: list[str], env: dict[str, str], log: Path, port: int, *,
                 name: str = "server", timeout: float = 60) -> Proc:
    """Start a server (``Proc``) and wait until ``GET http://127.0.0.1:<port>/health`` answers
    200. Raises ``RuntimeError`` with the log when it exits or does not get there within
    ``timeout`` seconds (and stops it)."""
    import requests

    proc = Proc(args, env, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.log_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{name} did not become healthy:\n{proc.log_text()}")


def start_fake_hub(repo_id: str, data_dir: Path, env: dict[str, str], log: Path, *,
                   throttle_bps: int | None = None) -> Proc:
    """``tests/fake_hub.py`` as a separate process serving ``data_dir`` as ``repo_id``; its
    endpoint is its ``first_line()`` (it hashes the files first)."""
    args = [sys.executable, "-m", "tests.fake_hub", "--repo", f"{repo_id}={data_dir}",
            "--port", "0"]
    if throttle_bps is not None:
        args += ["--throttle-bps", str(throttle_bps)]
    return Proc(args, env, log, stdout_pipe=True)


# --- files ------------------------------------------------------------------------------------

def write_random_file(path: Path, size: int) -> None:
    """``size`` random bytes at ``path`` (parents created), written 16 MiB at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = 16 << 20
    with path.open("wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def write_one_model_catalog(path: Path, model_id: str, name: str, repo_id: str, filename: str,
                            size: int) -> None:
    """A supported-models catalog holding one GGUF model: ``filename`` of ``size`` bytes in the
    Hugging Face repo ``repo_id``."""
    path.write_text(json.dumps({"models": [{
        "id": model_id, "name": name, "source": "hf_gguf", "repo_id": repo_id,
        "required_vram_mb": 64, "tags": ["bench"],
        "artifacts": [{"filename": filename, "size_bytes": size}]}]}))


# --- command line and run facts ---------------------------------------------------------------

WAIT_QUIET_HELP = "wait up to this long for idle cores before measuring"
# api_latency.py's and engine_overhead.py's wording of the same
WAIT_QUIET_OTHERS_HELP = "wait up to this long for other processes to leave the cores idle"


def add_quiet_args(parser: argparse.ArgumentParser, *, foreign_help: str,
                   wait_help: str = WAIT_QUIET_HELP) -> None:
    """The flags every benchmark shares: ``--wait-quiet SECONDS`` (for ``cpuwatch.wait_quiet``)
    and ``--max-foreign SHARE`` (how much of the cores other processes may take meanwhile)."""
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help=wait_help)
    parser.add_argument("--max-foreign", type=float, default=0.05, metavar="SHARE",
                        help=foreign_help)


def announce(bench: str) -> tuple[float, float]:
    """Print ``<bench> benchmark: <CPU>, <cores> cores, Python <version>, load average <1 min>``;
    returns (the time now, that load average), for ``run_facts``."""
    started = time.time()
    load_before = os.getloadavg()[0]
    print(f"{bench} benchmark: {cpu_model()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {load_before:.2f}")
    return started, load_before


def run_facts(bench: str, started: float, load_before: float, busy_before: float,
              ) -> dict[str, Any]:
    """The first keys of a summary: bench, start time, CPU, cores, load average before and
    after, the busy share of the cores before measuring."""
    return {"bench": bench,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_avg_before": round(load_before, 2), "busy_before": round(busy_before, 3),
            "load_avg_after": round(os.getloadavg()[0], 2)}


# --- figures and results ----------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def git_state() -> str:
    """The commit measured, with '+dirty' when llmlb's or the engines' code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "llmlb", "engines",
                                "plugins"], cwd=REPO, text=True, capture_output=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_info(**versions: Any) -> dict[str, Any]:
    """The machine and software measured: CPU, cores, Python, ``versions`` (in that order), the
    load average now and the llmlb commit."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            **versions, "loadavg_start": os.getloadavg()[0], "llmlb_commit": git_state()}


def save_summary(bench: str, summary: dict[str, Any], *, indent: int,
                 separators: tuple[str, str] | None = None) -> Path:
    """Save ``summary`` as ``bench/.work/results/<bench>-<time>.json`` (indented by ``indent``)
    and print it as the last line, on one line (``json.dumps`` with ``separators``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=indent))
    print(json.dumps(summary, separators=separators))
    return path


# --- CPU interference -------------------------------------------------------------------------

class Monitor:
    """``cpuwatch.CpuMonitor`` that also counts this process's children that have ended and been
    waited for (``curl``): CpuMonitor only sees live processes, so it would call them foreign.
    ``culprits()`` names the outside processes that used the most CPU meanwhile."""

    @staticmethod
    def _ticks() -> tuple[int, int]:
        """(reaped children's jiffies, all CPUs' jiffies since boot)."""
        stat = Path("/proc/self/stat").read_text()
        rest = stat[stat.rfind(")") + 2:].split()
        reaped = int(rest[13]) + int(rest[14])  # cutime + cstime
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return reaped, sum(fields)

    def start(self) -> None:
        self._monitor = CpuMonitor()
        self._monitor.start()
        self._start = self._ticks()
        self._procs = proc_stats()

    def foreign(self) -> float:
        share = self._monitor.foreign()
        reaped, total = self._ticks()
        self._total = total - self._start[1]
        return max(0.0, share - (reaped - self._start[0]) / max(1, self._total))

    def culprits(self, top: int = 3) -> str:
        now = proc_stats()
        mine, stack = set(), [os.getpid()]
        while stack:
            pid = stack.pop()
            mine.add(pid)
            stack.extend(p for p, v in now.items() if v[1] == pid and p not in mine)
        used = []
        for pid, (name, _ppid, user, system) in now.items():
            if pid in mine:
                continue
            before = self._procs.get(pid, (name, 0, 0, 0))
            ticks = user + system - before[2] - before[3]
            if ticks > 0:
                used.append((ticks, f"{name}[{pid}]"))
        used.sort(reverse=True)
        return ", ".join(f"{n} {t / max(1, self._total):.0%}" for t, n in used[:top]) or "kernel?"


@dataclass
class Stretched(Generic[T]):
    """What ``measure_in_stretches`` measured."""

    samples: list[T]
    redone: int = 0  # stretches measured again
    disturbed: int = 0  # stretches kept although still disturbed after the last try
    culprits: list[str] = field(default_factory=list)  # per disturbed try, with name_culprits


def measure_in_stretches(one: Callable[[], T], n: int, max_foreign: float, *, size: int = 100,
                         tries: int = 3, name_culprits: bool = False) -> Stretched[T]:
    """Call ``one()`` ``n`` times, in stretches of ``size`` calls. A stretch during which
    processes outside this benchmark's tree took more than ``max_foreign`` of the cores
    (``Monitor``) is measured again, ``tries`` times in all; the last try is kept either way.
    With ``name_culprits``, every disturbed try records ``Monitor.culprits()``."""
    result: Stretched[T] = Stretched([])
    monitor = Monitor()
    while len(result.samples) < n:
        k = min(size, n - len(result.samples))
        for attempt in range(tries):
            monitor.start()
            part = [one() for _ in range(k)]
            if monitor.foreign() <= max_foreign:
                break
            if name_culprits:
                result.culprits.append(monitor.culprits())
            if attempt < tries - 1:
                result.redone += 1
        else:
            result.disturbed += 1
        result.samples.extend(part)
    return result

"""``GET /metrics`` (LB-6): Prometheus text, with ``prometheus_client`` in multiprocess mode so
that every gunicorn worker's requests count.

What requests leave behind (counters, histograms) each worker writes to its own memory-mapped
files in ``$LLMLB_HOME/metrics`` (``PROMETHEUS_MULTIPROC_DIR``); a scrape merges the files.
The directory is wiped when the instance starts (the master's ``preflight``), so counters
start at zero with the process, as Prometheus expects; a process started some other way
(gunicorn without ``gunicorn.conf.py``, a test's server) removes only what dead processes
left, never a live worker's files. A worker that exits leaves its files
behind (its counts must not vanish: that would look like a counter reset); gunicorn's master
folds them into one ``*_folded.db`` file per type (``fold_dead_worker``), so that a scrape
reads as many files after 50 worker restarts as after none.

What is state rather than a count (nodes and their status, requests in flight, queues,
downloads) is read from where every worker sees it (the registry, the shared in-flight
counters) at scrape time, by ``StateCollector``: no file per worker, never stale.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import os_lock, process_id

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FOLDED_TYPES = ("counter", "histogram", "summary")
_value_class_dir: str | None = None  # the directory this process's metric values write to


def prepare_directory(directory: Path) -> None:
    """Empty the metrics directory and point prometheus_client at it (before workers fork,
    so that they inherit it)."""
    from .private_files import private_dir

    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    private_dir(directory)
    os.environ[ENV] = str(directory)


def clear_dead_files(directory: Path) -> None:
    """Remove the files of processes that are gone; all of them (the folded ones too) when
    no process that wrote here is alive: a new instance starts from zero."""
    from .private_files import private_dir

    private_dir(directory)
    files = metric_files(directory)
    live = [f for f in files if _pid_alive(f)]
    for path in files:
        if path not in live and (not live or not path.endswith("_folded.db")):
            with contextlib.suppress(OSError):
                os.remove(path)


def _pid_alive(path: str) -> bool:
    tail = os.path.basename(path).removesuffix(".db").rsplit("_", 1)[-1]
    if not tail.isdigit():
        return False
    try:
        os.kill(int(tail), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fold_dead_worker(pid: int, directory: str | None = None) -> None:
    """gunicorn's ``child_exit``: add a dead worker's counts to the folded files and remove its
    own, so that scrapes stay as fast after many restarts as at the start."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    directory = directory or os.environ.get(ENV)
    if not directory or not os.path.isdir(directory):
        return
    multiprocess.mark_process_dead(pid, directory)  # its live gauges
    for typ in FOLDED_TYPES:
        dead = os.path.join(directory, f"{typ}_{pid}.db")
        if not os.path.exists(dead):
            continue
        folded = os.path.join(directory, f"{typ}_folded.db")
        totals: dict[str, float] = {}
        for path in (folded, dead):
            if os.path.exists(path):
                for key, value, *_ in MmapedDict.read_all_values_from_file(path):
                    totals[key] = totals.get(key, 0.0) + value
        # Written aside and renamed: a scrape reads either the old folded file or the new one.
        tmp = os.path.join(directory, f"{typ}_folded.tmp")
        out = MmapedDict(tmp)
        for key, value in totals.items():
            out.write_value(key, value, 0.0)
        out.close()
        os.replace(tmp, folded)
        os.remove(dead)


# Increments are held in this process and written to its files at most FLUSH_SECONDS later
# (``_held_back``): a scrape this process answers writes them first, and so does a worker's
# exit (``Metrics.close``); another worker's scrape sees them within FLUSH_SECONDS, which a
# Prometheus scraping every 15 s never notices.
FLUSH_SECONDS = 0.5
_held_lock = os_lock.lock()  # around a few additions: never waits
_held: list = []  # the values with increments held
_series: dict[tuple[str, tuple[str, ...]], Any] = {}  # (sample name, label values) -> value


def _held_back(base: type) -> type:
    """prometheus_client's multiprocess value class ``base``, its increments held in memory
    until ``flush``. Each increment of ``base`` takes its lock, checks the process id and
    writes into the file's mmap, seven times a request (a histogram is two values): with
    prometheus_client's wrappers, 16.7 us of a proxied request's CPU, where ``observe``
    holding them costs 3 us (bench/RESULTS.md)."""

    class HeldBack(base):  # type: ignore[misc, valid-type]
        def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any,
                     labelvalues: Any, *args: Any, **kwargs: Any) -> None:
            self._pending = 0.0
            self._queued = False
            super().__init__(typ, metric_name, name, labelnames, labelvalues, *args, **kwargs)
            _series[(name, tuple(labelvalues))] = self  # found by Metrics.observe

        def inc(self, amount: float) -> None:
            _hold(((self, amount),))

        def get(self) -> float:
            with _held_lock:
                pending = self._pending
            return super().get() + pending

        def set(self, value: float, timestamp: float | None = None) -> None:
            with _held_lock:
                self._pending = 0.0  # what a set replaces
            super().set(value, timestamp)

        def write(self, amount: float) -> None:
            super().inc(amount)

    return HeldBack


def _hold(added: Any) -> None:
    """Hold the increments ``added`` ((value, amount) pairs) until the next ``flush``."""
    with _held_lock:
        for value, amount in added:
            value._pending += amount
            if not value._queued:
                value._queued = True
                _held.append(value)


def flush() -> None:
    """Write this process's held increments to its files."""
    with _held_lock:
        batch = [(value, value._pending) for value in _held]
        for value, _ in batch:
            value._pending, value._queued = 0.0, False
        _held.clear()
    for value, amount in batch:
        value.write(amount)


def _forget_held() -> None:
    # A forked child holds its parent's increments, which the parent writes itself.
    global _held_lock
    _held_lock = os_lock.lock()
    for value in _held:
        value._pending, value._queued = 0.0, False
    _held.clear()


os.register_at_fork(after_in_child=_forget_held)
_flusher: tuple[int, threading.Event] | None = None  # (the process that runs it, its stop)


def _flush_every(stop: threading.Event) -> None:
    while not stop.wait(FLUSH_SECONDS):
        try:
            flush()
        except Exception:  # a metrics file must never stop the counting
            log.exception("Writing the metrics failed")


class Metrics:
    """The request metrics of this process and the scrape of the whole instance."""

    def __init__(self, directory: Path, state: Callable[[], list[dict]]) -> None:
        from prometheus_client import Counter, Histogram, values

        if os.environ.get(ENV) != str(directory):
            # Not started by `llmlb serve` / gunicorn.conf.py (a test's server, gunicorn
            # without llmlb's config): what dead processes left goes, the files of live ones
            # (other workers of this instance) stay.
            clear_dead_files(directory)
            os.environ[ENV] = str(directory)
        self.directory = directory
        global _value_class_dir
        if _value_class_dir != str(directory):
            # A fresh value class: its files go to the directory just set, whatever an earlier
            # app in this process (tests) used; apps sharing a directory share the class (two
            # writers of one file would overwrite each other's entries).
            values.ValueClass = _held_back(
                values.MultiProcessValue(process_identifier=process_id.current))
            _value_class_dir = str(directory)
        labels = ("model", "node", "status")
        self.requests = Counter("llmlb_requests", "Requests answered, by model, node and HTTP "
                                "status (a client that left: 499)", labels, registry=None)
        self.latency = Histogram("llmlb_request_duration_seconds", "Time from request to the "
                                 "last byte of the answer", ("model", "node"), registry=None,
                                 buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("llmlb_time_to_first_token_seconds", "Time from request to the "
                              "first byte of the answer (the first token of a stream)",
                              ("model", "node"), registry=None, buckets=LATENCY_BUCKETS)
        self.tokens_in = Counter("llmlb_prompt_tokens", "Prompt tokens of answered requests, "
                                 "as the node reported them", ("model", "node"), registry=None)
        self.tokens_out = Counter("llmlb_completion_tokens", "Tokens generated, as the node "
                                  "reported them", ("model", "node"), registry=None)
        self._state = state
        self._values: dict[tuple[str, str, int], tuple] = {}
        self._pairs: dict[tuple[str, str], tuple] = {}

    def observe(self, model: str, node: str, status: int, latency: float, ttft: float | None,
                tokens_in: int | None, tokens_out: int | None) -> None:
        # Each series' values found once (see _values_of), then held together: what
        # prometheus_client's labels(), inc() and observe() do around them was most of the
        # cost of counting a request.
        values = self._values.get((model, node, status))
        if values is None:
            try:
                values = self._values_of(model, node, status)
            except KeyError as exc:  # another prometheus_client's names: never fail a request
                log.error("Metrics: no value for the sample %s; requests are not counted", exc)
                return
            values = self._values.setdefault((model, node, status), values)
        count, latency_sum, latency_buckets, ttft_sum, ttft_buckets, prompt, completion = values
        added = [(count, 1)]
        if status < 400:
            added += ((latency_sum, latency),
                      (latency_buckets[bisect_left(LATENCY_BUCKETS, latency)], 1))
            if ttft is not None:
                added += ((ttft_sum, ttft), (ttft_buckets[bisect_left(LATENCY_BUCKETS, ttft)], 1))
        if tokens_in:
            added.append((prompt, tokens_in))
        if tokens_out:
            added.append((completion, tokens_out))
        _hold(added)

    def _values_of(self, model: str, node: str, status: int) -> tuple:
        """The values of one request's series, made by prometheus_client's labels() (the
        files' keys, as its collector reads them) and found by their samples' names; a
        histogram's buckets in its bounds' order (+Inf last), as ``observe`` picks them."""
        from prometheus_client.utils import floatToGoString

        # Each looked up as soon as labels() made it: another Metrics of this process (a
        # test's second app) may have registered values of the same names since.
        pair = (model, node)
        values = self._pairs.get(pair)
        if values is None:
            for metric in (self.latency, self.ttft, self.tokens_in, self.tokens_out):
                metric.labels(model, node)
            bounds = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]
            values = self._pairs[pair] = (
                _series[("llmlb_request_duration_seconds_sum", pair)],
                [_series[("llmlb_request_duration_seconds_bucket", (*pair, b))]
                 for b in bounds],
                _series[("llmlb_time_to_first_token_seconds_sum", pair)],
                [_series[("llmlb_time_to_first_token_seconds_bucket", (*pair, b))]
                 for b in bounds],
                _series[("llmlb_prompt_tokens_total", pair)],
                _series[("llmlb_completion_tokens_total", pair)])
        self.requests.labels(model, node, str(status))
        return (_series[("llmlb_requests_total", (model, node, str(status)))], *values)

    def start(self) -> None:
        """Write held increments every FLUSH_SECONDS from now on (once per process)."""
        global _flusher
        if _flusher is None or _flusher[0] != os.getpid() or _flusher[1].is_set():
            _flusher = (os.getpid(), threading.Event())
            threading.Thread(target=_flush_every, args=(_flusher[1],), daemon=True,
                             name="llmlb-metrics").start()

    def close(self) -> None:
        """Write what is held (a worker that exits: its counts must not be lost)."""
        if _flusher is not None and _flusher[0] == os.getpid():
            _flusher[1].set()
        flush()

    def scrape(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        flush()  # this process's own counts, exact
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(self.directory))
        registry.register(StateCollector(self._state))
        return generate_latest(registry), CONTENT_TYPE_LATEST


class StateCollector:
    """Nodes, endpoints and their load as the registry and in-flight counters say now."""

    def __init__(self, state: Callable[[], list[dict]]) -> None:
        self._state = state

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("llmlb_node_up", "1 when the node or endpoint is online, "
                               "0 when offline or cooling down", labels=("node", "kind"))
        status = GaugeMetricFamily("llmlb_node_status", "1 for the node's current status",
                                   labels=("node", "kind", "status"))
        in_flight = GaugeMetricFamily("llmlb_in_flight_requests", "Requests the balancer has "
                                      "in flight at the node, all workers together",
                                      labels=("node",))
        queued = GaugeMetricFamily("llmlb_node_queued_requests", "Requests waiting at the "
                                   "node by its own report (an endpoint: its metrics, less "
                                   "the balancer's own requests)", labels=("node",))
        models = GaugeMetricFamily("llmlb_node_models", "Models ready on the node",
                                   labels=("node",))
        downloads = GaugeMetricFamily("llmlb_downloads_active", "Model downloads under way on "
                                      "the node", labels=("node",))
        for row in self._state():
            name, kind = row["name"], row["kind"]
            up.add_metric((name, kind), 1.0 if row["status"] == "online" else 0.0)
            status.add_metric((name, kind, row["status"]), 1.0)
            in_flight.add_metric((name,), float(row.get("in_flight") or 0))
            queued.add_metric((name,), float(row.get("queued_requests") or 0))
            models.add_metric((name,), float(len(row.get("models") or ())))
            downloads.add_metric((name,), float(sum(
                1 for d in row.get("downloads") or () if isinstance(d, dict)
                and d.get("status") in ("queued", "downloading", "running"))))
        yield from (up, status, in_flight, queued, models, downloads)


def metric_files(directory: Path) -> list[str]:
    return glob.glob(os.path.join(directory, "*.db"))

"""Usage (QT-3): requests, tokens, errors, latency and time to first token per hour, key,
model and node, rolled up from the request history as it is written (``history.py`` hands
each batch of rows to ``rollup``; ``state/usage.py`` adds the sums to ``usage_hourly`` in
the same transaction), so a year of traffic reads as a few thousand rows, never a scan of
the history. No Flask here.

Latency and time to first token are kept as histograms (counts per bucket of ``BOUNDS_MS``,
doubling widths), which add up across rows; p50 and p95 are read from the summed histogram
by interpolating inside the bucket that holds the rank (so within that bucket's width).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .state.usage import BUCKETS, COLUMNS, SUMS, UsageRollups

#: upper bounds of the histogram buckets, in ms; the last bucket has no upper bound
BOUNDS_MS = (5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 40960, 81920)
assert len(BOUNDS_MS) + 1 == BUCKETS
__all__ = ["COLUMNS", "rollup", "percentile", "percentiles", "summary", "bucket_range", "report"]
GROUPS = {"key": "key_name", "model": "model", "node": "node"}
SPANS = {"hour": 3600, "day": 86400}


def bucket_of(ms: float) -> int:
    return bisect.bisect_left(BOUNDS_MS, ms)


def rollup(rows: Iterable[Sequence[Any]]) -> dict[int, list[tuple]]:
    """History rows (``state.records.REQUEST_COLUMNS`` order) summed per (hour, key, model,
    node) and per (day, key, model, node): by bucket span (3600, 86400), one tuple each, key
    first then ``COLUMNS``, sorted (a fixed order, so two writers never deadlock)."""
    hourly = _hourly(rows)
    days: dict[tuple, list[int]] = {}
    for hour, *rest in hourly:
        group = (hour - hour % 86400, *rest[:3])
        s = days.get(group)
        if s is None:
            days[group] = list(rest[3:])
        else:
            for i, n in enumerate(rest[3:]):
                s[i] += n
    return {3600: hourly, 86400: [(*group, *s) for group, s in sorted(days.items())]}


def _hourly(rows: Iterable[Sequence[Any]]) -> list[tuple]:
    sums: dict[tuple, list[int]] = {}
    for at, key_name, _op, model, node, status, _stream, latency_ms, ttft_ms, t_in, t_out, \
            _error in rows:
        group = (int(at // 3600) * 3600, key_name or "", model or "", node or "")
        s = sums.get(group)
        if s is None:
            s = sums[group] = [0] * len(COLUMNS)
        s[0] += 1
        s[1] += status >= 400
        s[2] += t_in or 0
        s[3] += t_out or 0
        s[len(SUMS) + bucket_of(latency_ms)] += 1
        if ttft_ms is not None and status < 400:
            s[4] += 1
            s[len(SUMS) + BUCKETS + bucket_of(ttft_ms)] += 1
    return [(*group, *s) for group, s in sorted(sums.items())]


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms of a histogram over ``BOUNDS_MS``; None when empty."""
    return percentiles(histogram, (q,))[0]


def percentiles(histogram: Sequence[int], qs: Sequence[float]) -> list[float | None]:
    """The quantiles ``qs`` (0..1) in ms: in the first bucket whose running count reaches
    the rank, placed linearly within it."""
    running = list(itertools.accumulate(histogram))
    total = running[-1]
    if not total:
        return [None] * len(qs)
    out: list[float | None] = []
    for q in qs:
        rank = q * total
        # the first bucket reaching the rank (it holds requests: a rank above 0 is reached
        # where the running count grows); the lowest that holds any for a rank of 0
        i = min(bisect.bisect_left(running, rank) if rank > 0 else
                next(j for j, n in enumerate(histogram) if n), BUCKETS - 1)
        n = histogram[i]
        seen = running[i - 1] if i > 0 else 0
        low = BOUNDS_MS[i - 1] if i > 0 else 0
        if i >= len(BOUNDS_MS) or not n:
            out.append(float(low))
        else:
            out.append(round(low + (BOUNDS_MS[i] - low) * max(0.0, rank - seen) / n, 1))
    return out


def summary(counts: Sequence[int]) -> dict[str, Any]:
    """A point's counts (``COLUMNS`` order, summed) as ``/v0/usage`` answers it."""
    hist = len(SUMS)
    lat50, lat95 = percentiles(counts[hist:hist + BUCKETS], (0.5, 0.95))
    ttft50, ttft95 = percentiles(counts[hist + BUCKETS:], (0.5, 0.95))
    return {"requests": counts[0], "errors": counts[1], "tokens_in": counts[2],
            "tokens_out": counts[3], "latency_p50_ms": lat50, "latency_p95_ms": lat95,
            "ttft_p50_ms": ttft50, "ttft_p95_ms": ttft95}


def bucket_range(since: float | None, until: float | None, span: int,
                 ) -> tuple[int | None, int | None]:
    """The bucket starts a time range covers: from the bucket (of ``span`` seconds, UTC)
    holding ``since`` to the one holding ``until``."""
    first = int(math.floor(since / span) * span) if since is not None else None
    last = int(math.floor(until / span) * span) if until is not None else None
    return first, last


def report(rollups: UsageRollups, *, bucket: str, group: str | None,
           filters: Mapping[str, str | None], since: float | None,
           until: float | None) -> dict[str, Any]:
    """``/v0/usage``: per bucket (and per key, model or node with ``group``) and in total."""
    first, last = bucket_range(since, until, SPANS[bucket])
    rows = rollups.query(span=SPANS[bucket], group=GROUPS[group] if group else None,
                         filters={GROUPS[k]: v for k, v in filters.items() if v},
                         first=first, last=last)
    points = [list(row.values()) for row in rows]  # (start, grp, *COLUMNS): by position
    data = []
    for start, grp, *counts in points:
        item = {"start": int(start), **summary(counts)}
        if group:
            item[group] = grp or None
        data.append(item)
    columns = itertools.islice(zip(*points, strict=True), 2, None)
    total = [sum(column) for column in columns] if points else [0] * len(COLUMNS)
    return {"object": "usage", "bucket": bucket, "group": group, "from": first, "to": until,
            "filters": {k: v for k, v in filters.items() if v}, "data": data,
            "total": summary(total)}

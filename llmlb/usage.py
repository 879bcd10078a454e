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
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .state.usage import BUCKETS, COLUMNS, LAT, SUMS, TTFT, UsageRollups

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
    """The quantiles ``qs`` (ascending, 0..1) in ms, in one pass over the histogram."""
    total = sum(histogram)
    if not total:
        return [None] * len(qs)
    out: list[float | None] = []
    seen, i = 0, 0
    for q in qs:
        rank = q * total
        while i < BUCKETS - 1 and (not histogram[i] or seen + histogram[i] < rank):
            seen += histogram[i]
            i += 1
        n = histogram[i]
        low = BOUNDS_MS[i - 1] if i > 0 else 0
        if i >= len(BOUNDS_MS) or not n:
            out.append(float(low))
        else:
            out.append(round(low + (BOUNDS_MS[i] - low) * max(0.0, rank - seen) / n, 1))
    return out


def summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """A summed row (``UsageRollups.query``) as ``/v0/usage`` answers it."""
    lat50, lat95 = percentiles([row[c] for c in LAT], (0.5, 0.95))
    ttft50, ttft95 = percentiles([row[c] for c in TTFT], (0.5, 0.95))
    return {"requests": row["requests"], "errors": row["errors"],
            "tokens_in": row["tokens_in"], "tokens_out": row["tokens_out"],
            "latency_p50_ms": lat50, "latency_p95_ms": lat95,
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
    total = dict.fromkeys(COLUMNS, 0)
    data = []
    for row in rows:
        for c in COLUMNS:
            total[c] += row[c]
        item = {"start": int(row["start"]), **summary(row)}
        if group:
            item[group] = row["grp"] or None
        data.append(item)
    return {"object": "usage", "bucket": bucket, "group": group, "from": first, "to": until,
            "filters": {k: v for k, v in filters.items() if v}, "data": data,
            "total": summary(total)}

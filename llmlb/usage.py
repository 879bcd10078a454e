"""Usage (QT-3): requests, tokens, errors, latency and time to first token per hour, key,
model and node, rolled up from the request history as it is written (``history.py`` hands
each batch of rows to ``rollup``; ``state/usage.py`` adds the sums to ``usage_hourly`` in
the same transaction), so a year of traffic reads as a few thousand rows, never a scan of
the history. No Flask here.

Latency and time to first token are kept as histograms (counts per bucket of ``BOUNDS_MS``,
doubling widths), which add up across rows; p50 and p95 are read from the summed histogram by
the database (``state/usage.py``), interpolated inside the bucket that holds the rank (so
within that bucket's width), and answered to a tenth of a millisecond.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .state.usage import BOUNDS_MS, BUCKETS, COLUMNS, POINT, SUMS, UsageRollups

__all__ = ["BOUNDS_MS", "COLUMNS", "rollup", "bucket_range", "report"]
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


def _answer(requests: int, errors: int, tokens_in: int, tokens_out: int,
            *quantiles: float | None) -> dict[str, Any]:
    """A point's ``POINT`` values as ``/v0/usage`` answers them, quantiles to 0.1 ms."""
    return dict(zip(POINT, (requests, errors, tokens_in, tokens_out,
                            *(None if q is None else round(q, 1) for q in quantiles)),
                    strict=True))


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
    span, where = SPANS[bucket], {GROUPS[k]: v for k, v in filters.items() if v}
    data = []
    for start, grp, *point in rollups.query(span=span, group=GROUPS[group] if group else None,
                                            filters=where, first=first, last=last):
        item = {"start": int(start), **_answer(*point)}
        if group:
            item[group] = grp or None
        data.append(item)
    return {"object": "usage", "bucket": bucket, "group": group, "from": first, "to": until,
            "filters": {k: v for k, v in filters.items() if v}, "data": data,
            "total": _answer(*rollups.total(span=span, filters=where, first=first,
                                           last=last))}

"""The usage roll-ups: ``usage_hourly`` and ``usage_daily``, one row per hour (day), key,
model and node, with sums and histograms (``llmlb/usage.py`` says what the columns mean).
Added to as the history is written, in its transaction; read summed per hour (from the
hourly rows) or per day (from the daily ones: a year is 365 rows per key, model and node),
optionally per key, model or node. Their sums per key, per model, per node and in all
(``usage_hourly_by``, ``usage_daily_by``) are added in the same statements' transaction, so
that a view without filters reads a row per point instead of adding up every key, model
and node of it. The SQL only.

Latency and time to first token are histograms: counts per bucket of ``BOUNDS_MS``. Their
p50 and p95 are computed by the database, from the histogram summed over what a point covers
(``quantile``): the 32 bucket counts of a point never cross into Python, only its quantiles do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine import Engine, Tx
from .schema import USAGE_COUNTS

GROUP_COLUMNS = ("key_name", "model", "node")
#: the counts of a roll-up row after its key (hour or day, key_name, model, node)
COLUMNS = USAGE_COUNTS
SUMS = COLUMNS[:5]
BUCKETS = 16  # of each histogram
#: upper bounds of the histogram buckets, in ms (doubling widths); the last bucket has none
BOUNDS_MS = (5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 40960, 81920)
assert len(BOUNDS_MS) + 1 == BUCKETS
#: what ``UsageRollups.query`` and ``total`` answer per point, after its start and group
POINT = ("requests", "errors", "tokens_in", "tokens_out", "latency_p50_ms", "latency_p95_ms",
         "ttft_p50_ms", "ttft_p95_ms")
TABLES = {3600: ("usage_hourly", "hour"), 86400: ("usage_daily", "day")}


#: the roll-ups once more per one of their group columns, and in all (``{table}_by``)
DIMS = {"key_name": "key", "model": "model", "node": "node"}


def quantile(histogram: str, total: str, q: float) -> str:
    """SQL for the q-quantile (0 < q < 1), in ms, of the histogram in columns ``histogram``0..15
    that holds ``total`` values: in the first bucket whose running count reaches the rank, placed
    linearly within it (the last bucket, unbounded, answers its lower bound); NULL when empty.
    Floating point on both engines (a bare decimal literal would be NUMERIC on PostgreSQL)."""
    rank = f"({total} * CAST({q!r} AS DOUBLE PRECISION))"
    whens, running, low = [], [], 0
    for i, high in enumerate(BOUNDS_MS):
        seen = " + ".join(running) or "0"
        running.append(f"{histogram}{i}")
        # reached here and not before: the bucket holds values, so the division is safe
        whens.append(f"WHEN {' + '.join(running)} >= {rank} THEN "
                     f"{low} + {high - low} * ({rank} - ({seen})) / {histogram}{i}")
        low = high
    return (f"CASE WHEN {total} = 0 THEN NULL {' '.join(whens)} "
            f"ELSE CAST({low} AS DOUBLE PRECISION) END")


#: a point's ``POINT`` columns from its summed ``COLUMNS``
_POINT_SQL = ", ".join((*SUMS[:4], *(
    f"{quantile(histogram, total, q)} AS {name}"
    for histogram, total, names in (("lat", "requests", POINT[4:6]),
                                    ("ttft", "ttft_count", POINT[6:8]))
    for q, name in zip((0.5, 0.95), names, strict=True))))


def _upsert(table: str, keys: Sequence[str]) -> str:
    names = (*keys, *COLUMNS)
    adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in COLUMNS)
    return (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {adds}")


def by_dimension(rows: Sequence[Sequence[Any]]) -> list[tuple]:
    """Roll-up rows (bucket, key_name, model, node, *columns) summed per bucket and key, per
    bucket and model, per bucket and node, and per bucket: (dim, bucket, value, *columns),
    sorted (one order for every writer)."""
    sums: dict[tuple, list[int]] = {}
    for bucket, *groups_and_counts in rows:
        counts = groups_and_counts[len(GROUP_COLUMNS):]
        for group in (*((dim, bucket, groups_and_counts[i])
                        for i, dim in enumerate(DIMS.values())), ("all", bucket, "")):
            s = sums.get(group)
            if s is None:
                sums[group] = list(counts)
            else:
                for i, n in enumerate(counts):
                    s[i] += n
    return [(*group, *s) for group, s in sorted(sums.items())]


class UsageRollups:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._add = {span: (_upsert(table, (bucket, *GROUP_COLUMNS)),
                            _upsert(f"{table}_by", ("dim", bucket, "value")))
                     for span, (table, bucket) in TABLES.items()}

    def add(self, tx: Tx, span: int, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (bucket start, key_name, model, node, *columns) for the hourly (``span``
        3600) or daily (86400) roll-ups, added to what is there (and to their sums per key,
        model, node and in all)."""
        if rows:
            rollups, by = self._add[span]
            tx.executemany(rollups, rows)
            tx.executemany(by, by_dimension(rows))

    def _points(self, span: int, group: str | None, filters: dict[str, str] | None,
                first: int | None, last: int | None) -> tuple[str, list[Any]]:
        """A SELECT of (start, grp, *COLUMNS) per point, and its arguments."""
        table, start = TABLES[span]
        assert group is None or group in GROUP_COLUMNS
        assert all(column in GROUP_COLUMNS for column in filters or {})
        # Without filters a point is one row of the sums per dimension: nothing to add up.
        where = [f"{column} = ?" for column in filters] if filters else ["dim = ?"]
        args: list[Any] = list(filters.values()) if filters else [
            DIMS[group] if group else "all"]
        for clause, value in ((f"{start} >= ?", first), (f"{start} <= ?", last)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if not filters:
            return (f"SELECT {start} AS start, {'value' if group else 'NULL'} AS grp, "
                    f"{', '.join(COLUMNS)} FROM {table}_by WHERE {' AND '.join(where)}", args)
        # Whole numbers on both engines (PostgreSQL's SUM of a BIGINT is a numeric).
        sums = ", ".join(f"CAST(SUM({c}) AS BIGINT) AS {c}" for c in COLUMNS)
        return (f"SELECT {start} AS start, {group or 'NULL'} AS grp, {sums} FROM {table} "
                f"WHERE {' AND '.join(where)} GROUP BY {start}{', ' + group if group else ''}",
                args)

    def query(self, *, span: int, group: str | None = None,
              filters: dict[str, str] | None = None, first: int | None = None,
              last: int | None = None) -> list[tuple]:
        """Per bucket of ``span`` seconds (3600 or 86400) and per ``group`` column when given:
        (start, group value or None, *``POINT``); oldest first. ``first`` and ``last``: the
        first and last bucket starts."""
        points, args = self._points(span, group, filters, first, last)
        return self.engine.execute(
            f"SELECT start, grp, {_POINT_SQL} FROM ({points}) p ORDER BY start, grp", args,
            tuples=True).fetchall()

    def total(self, *, span: int, filters: dict[str, str] | None = None,
              first: int | None = None, last: int | None = None) -> tuple:
        """What ``query`` answers for the whole range at once: ``POINT``."""
        points, args = self._points(span, None, filters, first, last)
        sums = ", ".join(f"CAST(COALESCE(SUM({c}), 0) AS BIGINT) AS {c}" for c in COLUMNS)
        return self.engine.execute(f"SELECT {_POINT_SQL} FROM (SELECT {sums} FROM ({points}) "
                                   "p) t", args, tuples=True).fetchall()[0]

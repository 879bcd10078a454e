"""The usage roll-ups: ``usage_hourly`` and ``usage_daily``, one row per hour (day), key,
model and node, with sums and histograms (``llmlb/usage.py`` says what the columns mean).
Added to as the history is written, in its transaction; read summed per hour (from the
hourly rows) or per day (from the daily ones: a year is 365 rows per key, model and node),
optionally per key, model or node. The SQL only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine import Engine, Row, Tx
from .schema import USAGE_COUNTS

GROUP_COLUMNS = ("key_name", "model", "node")
#: the counts of a roll-up row after its key (hour or day, key_name, model, node)
COLUMNS = USAGE_COUNTS
SUMS = COLUMNS[:5]
BUCKETS = 16  # of each histogram
LAT, TTFT = COLUMNS[5:5 + BUCKETS], COLUMNS[5 + BUCKETS:]
TABLES = {3600: ("usage_hourly", "hour"), 86400: ("usage_daily", "day")}


class UsageRollups:
    def __init__(self, engine: Engine) -> None:
        self.engine, self.columns = engine, COLUMNS
        self._add = {}
        for span, (table, bucket) in TABLES.items():
            names = (bucket, *GROUP_COLUMNS, *self.columns)
            adds = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in self.columns)
            self._add[span] = (f"INSERT INTO {table} ({', '.join(names)}) VALUES "
                               f"({', '.join('?' * len(names))}) ON CONFLICT ({bucket}, "
                               f"key_name, model, node) DO UPDATE SET {adds}")

    def add(self, tx: Tx, span: int, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (bucket start, key_name, model, node, *columns) for the hourly (``span``
        3600) or daily (86400) roll-ups, added to what is there."""
        if rows:
            tx.executemany(self._add[span], rows)

    def query(self, *, span: int, group: str | None = None,
              filters: dict[str, str] | None = None, first: int | None = None,
              last: int | None = None) -> list[Row]:
        """Sums per bucket of ``span`` seconds (3600 or 86400), as ``start``, and per
        ``group`` column (as ``grp``) when given; oldest first. ``first`` and ``last``: the
        first and last bucket starts."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (filters or {}).items():
            assert column in GROUP_COLUMNS
            where.append(f"{column} = ?")
            args.append(value)
        table, start = TABLES[span]
        for clause, value in ((f"{start} >= ?", first), (f"{start} <= ?", last)):
            if value is not None:
                where.append(clause)
                args.append(value)
        assert group is None or group in GROUP_COLUMNS
        # Whole numbers on both engines (PostgreSQL's SUM of a BIGINT is a numeric).
        sums = ", ".join(f"CAST(SUM({c}) AS BIGINT) AS {c}" for c in self.columns)
        sql = (f"SELECT {start} AS start, {group or 'NULL'} AS grp, {sums} FROM {table}"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" GROUP BY {start}{', ' + group if group else ''} ORDER BY start"
               + (", grp" if group else ""))
        return self.engine.execute(sql, args).fetchall()

"""The usage roll-ups: ``usage_hourly``, one row per hour, key, model and node, with sums and
histograms (``llmlb/usage.py`` says what the columns mean). Added to as the history is
written, in its transaction; read summed per hour or day, optionally per key, model or
node. The SQL only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .engine import Engine, Row, Tx

GROUP_COLUMNS = ("key_name", "model", "node")
BUCKETS = 16  # of each histogram (``schema``'s lat0…lat15, ttft0…ttft15)
SUMS = ("requests", "errors", "tokens_in", "tokens_out", "ttft_count")
LAT = tuple(f"lat{i}" for i in range(BUCKETS))
TTFT = tuple(f"ttft{i}" for i in range(BUCKETS))
#: the columns of ``usage_hourly`` after its key (hour, key_name, model, node)
COLUMNS = (*SUMS, *LAT, *TTFT)


class UsageRollups:
    def __init__(self, engine: Engine) -> None:
        self.engine, self.columns = engine, COLUMNS
        names = ("hour", *GROUP_COLUMNS, *self.columns)
        adds = ", ".join(f"{c} = usage_hourly.{c} + excluded.{c}" for c in self.columns)
        self._add = (f"INSERT INTO usage_hourly ({', '.join(names)}) VALUES "
                     f"({', '.join('?' * len(names))}) ON CONFLICT (hour, key_name, model, "
                     f"node) DO UPDATE SET {adds}")

    def add(self, tx: Tx, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of (hour, key_name, model, node, *columns), added to what is there."""
        if rows:
            tx.executemany(self._add, rows)

    def query(self, *, span: int, group: str | None = None,
              filters: dict[str, str] | None = None, first: int | None = None,
              last: int | None = None) -> list[Row]:
        """Sums per bucket of ``span`` seconds (3600 or 86400), as ``start``, and per
        ``group`` column (as ``grp``) when given; oldest first."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (filters or {}).items():
            assert column in GROUP_COLUMNS
            where.append(f"{column} = ?")
            args.append(value)
        for clause, value in (("hour >= ?", first), ("hour <= ?", last)):
            if value is not None:
                where.append(clause)
                args.append(value)
        start = "hour" if span == 3600 else f"hour - (hour % {int(span)})"
        assert group is None or group in GROUP_COLUMNS
        sums = ", ".join(f"SUM({c}) AS {c}" for c in self.columns)
        sql = (f"SELECT {start} AS start, {group or 'NULL'} AS grp, {sums} FROM usage_hourly"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" GROUP BY {start}{', ' + group if group else ''} ORDER BY start"
               + (", grp" if group else ""))
        return self.engine.execute(sql, args).fetchall()

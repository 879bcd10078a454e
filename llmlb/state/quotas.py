"""The counters of per-key limits: one row per key and window (``key_counters``), leases of
the requests running at once (``key_leases``). The SQL only; ``limits.py`` decides what the
numbers mean.

Each check is atomic on its own, so limits hold across workers and balancers: a window's
count is one ``INSERT … ON CONFLICT … DO UPDATE … RETURNING`` (the row is locked while it
changes; a window that has ended starts again in the same statement). A lease is one more
on the key's ``concurrent`` row, granted only below the limit, with a lease row that says
until when; on PostgreSQL both in one statement (a writable CTE), on SQLite in one
``BEGIN IMMEDIATE`` transaction. A block of slots (``take`` > 1: a process far from the
key's limit reserving several, ``limits.Limiter``) is that many lease rows, taken together or
not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .engine import Engine, Result, Tx

_RESET = "key_counters.ends <= excluded.starts"
_COUNT = (
    "INSERT INTO key_counters (key_id, span, starts, ends, used) VALUES {values} "
    "ON CONFLICT (key_id, span) DO UPDATE SET "
    f"used = CASE WHEN {_RESET} THEN excluded.used ELSE key_counters.used + excluded.used END, "
    f"starts = CASE WHEN {_RESET} THEN excluded.starts ELSE key_counters.starts END, "
    f"ends = CASE WHEN {_RESET} THEN excluded.ends ELSE key_counters.ends END "
    "RETURNING span, ends, used")
_SLOT = ("INSERT INTO key_counters (key_id, span, starts, ends, used) VALUES "
         "(?, 'concurrent', 0, 0, ?) ON CONFLICT (key_id, span) DO UPDATE SET "
         "used = key_counters.used + excluded.used "
         "WHERE key_counters.used + excluded.used <= ? RETURNING key_id, used")
_FREE = "UPDATE key_counters SET used = used - {n} WHERE key_id = {key} AND span = 'concurrent'"


def _count(run: Callable[..., Result], key_id: int,
           spans: Sequence[tuple[str, float, float, int]]) -> dict[str, tuple[int, float]]:
    if not spans:
        return {}
    spans = sorted(spans)  # one order everywhere: two checks never deadlock
    values = ", ".join(["(?, ?, ?, ?, ?)"] * len(spans))
    params = [v for span, starts, ends, n in spans for v in (key_id, span, starts, ends, n)]
    rows = run(_COUNT.format(values=values), params).fetchall()
    return {r["span"]: (r["used"], r["ends"]) for r in rows}


def _take(tx: Tx, key_id: int, limit: int, expires: float, n: int,
          ) -> tuple[list[int], int | None]:
    row = tx.execute(_SLOT, (key_id, n, limit)).fetchone()
    if row is None:
        return [], None
    values = ", ".join(["(?, ?)"] * n)
    leases = tx.execute(f"INSERT INTO key_leases (key_id, expires) VALUES {values} RETURNING id",
                        [key_id, expires] * n).fetchall()
    return [r["id"] for r in leases], row["used"]


class Quotas:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self, key_id: int, spans: Sequence[tuple[str, float, float, int]],
              ) -> dict[str, tuple[int, float]]:
        """Add to the key's windows — (span, start, end, amount) each, the start and end a
        new window would have — and return each window's (count, end)."""
        return _count(self.engine.execute, key_id, spans)

    def admit(self, key_id: int, spans: Sequence[tuple[str, float, float, int]],
              slots: int | None, expires: float, most: dict[str, int], take: int = 1,
              ) -> tuple[dict[str, tuple[int, float]], list[int], int | None]:
        """A request's check: its windows counted (``count``) and, unless a window's count
        is then above its ``most`` (span -> the highest count that still admits), ``take``
        leases taken when the key has ``slots``: (the counts, the lease ids, none when the
        slots were not there, and the running count with them). One transaction on SQLite;
        one statement on PostgreSQL."""
        if not self.engine.writable_ctes:
            with self.engine.transaction() as tx:
                counted = _count(tx.execute, key_id, spans)
                if slots is None or any(c[0] > most[s] for s, c in counted.items()):
                    return counted, [], None
                return counted, *_take(tx, key_id, slots, expires, take)
        if slots is None or not spans:
            counted = _count(self.engine.execute, key_id, spans)
            return (counted, *(self.take_lease(key_id, slots, expires, take) if slots
                               else ([], None)))
        spans = sorted(spans)
        values = ", ".join(["(?, ?, ?, ?, ?)"] * len(spans))
        params = [v for span, starts, ends, n in spans for v in (key_id, span, starts, ends, n)]
        highest = "CASE span " + " ".join(["WHEN ? THEN CAST(? AS BIGINT)"] * len(most)) + " END"
        rows = self.engine.execute(
            f"WITH w AS ({_COUNT.format(values=values)}), slot AS ("
            + _SLOT.replace("VALUES (?, 'concurrent', 0, 0, ?)",
                            "SELECT ?, 'concurrent', 0, 0, CAST(? AS BIGINT) WHERE NOT EXISTS "
                            f"(SELECT 1 FROM w WHERE used > {highest})")
            + "), lease AS (INSERT INTO key_leases (key_id, expires) SELECT key_id, ? FROM slot, "
            "generate_series(1, CAST(? AS INTEGER)) RETURNING id) SELECT w.span, w.ends, w.used, "
            "(SELECT array_agg(id) FROM lease) AS leases, (SELECT used FROM slot) AS running "
            "FROM (SELECT 1 AS one) AS one LEFT JOIN w ON true",
            (*params, key_id, take, *[v for item in most.items() for v in item], slots, expires,
             take)).fetchall()
        return ({r["span"]: (r["used"], r["ends"]) for r in rows if r["span"]},
                sorted(rows[0]["leases"] or []), rows[0]["running"])

    def take_lease(self, key_id: int, limit: int, expires: float, n: int = 1,
                   ) -> tuple[list[int], int | None]:
        """``n`` lease ids when the key has at most ``limit - n`` running (else none), and
        the running count with them."""
        if self.engine.writable_ctes:
            rows = self.engine.execute(
                f"WITH slot AS ({_SLOT}) INSERT INTO key_leases (key_id, expires) "
                "SELECT key_id, ? FROM slot, generate_series(1, CAST(? AS INTEGER)) "
                "RETURNING id, (SELECT used FROM slot) AS running",
                (key_id, n, limit, expires, n)).fetchall()
            return sorted(r["id"] for r in rows), rows[0]["running"] if rows else None
        with self.engine.transaction() as tx:
            return _take(tx, key_id, limit, expires, n)

    def settle(self, key_id: int, spans: Sequence[tuple[str, float, float, int]],
               lease: int | None) -> None:
        """A request's end: its tokens added to the key's windows (``count``), its lease
        given back; one statement on PostgreSQL, one transaction on SQLite."""
        if self.engine.writable_ctes:
            if lease is None:
                _count(self.engine.execute, key_id, spans)
                return
            release = ("WITH gone AS (DELETE FROM key_leases WHERE id = ? RETURNING key_id), "
                       "freed AS (" + _FREE.format(n="1", key="(SELECT key_id FROM gone)")
                       + " RETURNING key_id) ")
            if not spans:
                self.engine.execute(release + "SELECT COUNT(*) AS n FROM freed", (lease,))
                return
            _count(lambda sql, params: self.engine.execute(release + sql, (lease, *params)),
                   key_id, spans)
            return
        with self.engine.transaction() as tx:
            _count(tx.execute, key_id, spans)
            if lease is not None:
                row = tx.execute("DELETE FROM key_leases WHERE id = ? RETURNING key_id",
                                 (lease,)).fetchone()
                if row is not None:  # else it expired and was swept: counted back already
                    tx.execute(_FREE.format(n="1", key="?"), (row["key_id"],))

    def give_back(self, key_id: int, spans: Sequence[tuple[str, float, float, int]],
                  requests: tuple[float, int] | None, leases: Sequence[int]) -> None:
        """What a process reserved and did not use, given back with the tokens it counted
        meanwhile (``count``): ``requests`` (the minute window's end, how many: nothing when
        that window has ended) and ``leases``. One transaction."""
        with self.engine.transaction() as tx:
            _count(tx.execute, key_id, spans)
            if requests is not None and requests[1] > 0:
                tx.execute("UPDATE key_counters SET used = CASE WHEN used > ? THEN used - ? "
                           "ELSE 0 END WHERE key_id = ? AND span = 'rpm' AND ends = ?",
                           (requests[1], requests[1], key_id, requests[0]))
            if leases:
                marks = ", ".join("?" * len(leases))
                gone = tx.execute(f"DELETE FROM key_leases WHERE id IN ({marks})",
                                  tuple(leases)).rowcount
                if gone > 0:  # those that expired were counted back by a sweep already
                    tx.execute(_FREE.format(n="?", key="?"), (gone, key_id))

    def sweep_leases(self, key_id: int, now: float) -> int:
        """Give back the key's leases that expired (their process died); how many."""
        if self.engine.writable_ctes:
            row = self.engine.execute(
                "WITH dead AS (DELETE FROM key_leases WHERE key_id = ? AND expires < ? "
                "RETURNING id) " + _FREE.format(n="(SELECT COUNT(*) FROM dead)", key="?")
                + " RETURNING (SELECT COUNT(*) FROM dead) AS n", (key_id, now, key_id)
            ).fetchone()
            return row["n"] if row else 0
        with self.engine.transaction() as tx:
            dead = tx.execute("DELETE FROM key_leases WHERE key_id = ? AND expires < ?",
                              (key_id, now)).rowcount
            if dead > 0:
                tx.execute(_FREE.format(n="?", key="?"), (dead, key_id))
        return max(dead, 0)

    def renew_leases(self, leases: Sequence[int], expires: float) -> None:
        marks = ", ".join("?" * len(leases))
        self.engine.execute(f"UPDATE key_leases SET expires = ? WHERE id IN ({marks})",
                            (expires, *leases))

    def current(self, key_ids: Sequence[int], now: float) -> dict[int, dict[str, int]]:
        """Per key: each window's count while it lasts, and the live leases
        (``concurrent``)."""
        out: dict[int, dict[str, int]] = {k: {} for k in key_ids}
        if not key_ids:
            return out
        marks = ", ".join("?" * len(key_ids))
        for r in self.engine.execute(f"SELECT key_id, span, used FROM key_counters WHERE "
                                     f"key_id IN ({marks}) AND span <> 'concurrent' AND "
                                     f"ends > ?", (*key_ids, now)):
            out[r["key_id"]][r["span"]] = r["used"]
        for r in self.engine.execute(f"SELECT key_id, COUNT(*) AS n FROM key_leases WHERE "
                                     f"key_id IN ({marks}) AND expires >= ? GROUP BY key_id",
                                     (*key_ids, now)):
            out[r["key_id"]]["concurrent"] = r["n"]
        return out

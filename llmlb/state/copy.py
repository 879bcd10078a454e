"""``llmlb db copy``: an SQLite state moved into PostgreSQL, whole — keys (hashed, so they
keep working), users and their sessions' versions, the request history, the hub's records,
the node registry, stored responses and model aliases, small settings (the dashboard's
signing key among them) — in one transaction on the target, ids kept, so nothing
half-copied is ever seen.
"""

from __future__ import annotations

from . import State, schema
from .accounts import KEYS, USERS
from .agents import ALIASES
from .members import MEMBERS

BATCH = 10_000


class TargetNotEmpty(Exception):
    """The target already holds state (pass ``force`` to replace it)."""

    def __init__(self, tables: list[str]) -> None:
        super().__init__(", ".join(tables))
        self.tables = tables


def copy_state(source: State, target: State, *, force: bool = False) -> dict[str, int]:
    """Copy every table of ``source`` into ``target``; rows copied per table."""
    counts: dict[str, int] = {}
    with target.engine.transaction() as tx:
        filled = [t for t in schema.TABLES
                  if tx.execute(f"SELECT 1 AS one FROM {t} LIMIT 1").fetchone()]
        if filled and not force:
            raise TargetNotEmpty(filled)
        for table in reversed(schema.TABLES):
            tx.execute(f"DELETE FROM {table}")
        for table in schema.TABLES:
            counts[table] = 0
            for rows in _batches(source, table):
                target.engine.copy_rows(tx, table, list(rows[0]), [tuple(r.values())
                                                                   for r in rows])
                counts[table] += len(rows)
        for table in schema.IDENTITY_TABLES:
            target.engine.continue_ids(tx, table)
        tx.changed(KEYS)
        tx.changed(USERS)
        tx.changed(MEMBERS)
        tx.changed(ALIASES)
    return counts


def _batches(source: State, table: str):  # noqa: ANN202 - an iterator of row lists
    if table not in schema.IDENTITY_TABLES:
        rows = source.engine.execute(f"SELECT * FROM {table}").fetchall()
        if rows:
            yield rows
        return
    last = -1
    while True:
        rows = source.engine.execute(f"SELECT * FROM {table} WHERE id > ? ORDER BY id "
                                     f"LIMIT {BATCH}", (last,)).fetchall()
        if not rows:
            return
        yield rows
        last = rows[-1]["id"]

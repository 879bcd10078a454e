"""What the key lookup of every request costs, per engine and per way of writing the SQL.

Measures, in one process, the median and p99 of one API-key lookup:

- ``cached``: ``state.keys.active`` as the app calls it, answered from the worker's cache
  (what every request pays while no key changes);
- ``hand-written``: the same SELECT through the engine, no cache (a cache miss);
- ``SQLAlchemy Core``: the same SELECT built with ``sqlalchemy.select`` on a ``Table`` and run
  on a pooled SQLAlchemy connection (the alternative to hand-written SQL; with ``--sqlalchemy
  DIR``, a folder where ``pip install --target DIR 'sqlalchemy>=2,<2.2'`` put it: llmlb does
  not depend on it).

Both SQLite (a file under bench/.work) and PostgreSQL (Debian's, started in a temporary
directory as tests/postgres.py does) are measured.

    .venv/bin/python bench/state_lookup.py [--sqlalchemy /tmp/sa] [-n 5000]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import time
from collections.abc import Callable

from common import REPO, WORK_ROOT, machine_info, percentile, save_summary

sys.path.insert(0, str(REPO))


def timed(fn: Callable[[], object], n: int) -> dict[str, float]:
    for _ in range(200):  # warm: prepared statements, caches, pools
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return {"p50_us": round(statistics.median(samples), 1),
            "p99_us": round(percentile(samples, 99), 1)}


def sqlalchemy_lookup(url: str, key_hash: str) -> Callable[[], object]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    meta = sa.MetaData()
    keys = sa.Table("api_keys", meta, sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.Text), sa.Column("scopes", sa.Text),
                    sa.Column("key_hash", sa.Text), sa.Column("last_used_at", sa.Float),
                    sa.Column("revoked_at", sa.Float))
    query = sa.select(keys.c.id, keys.c.name, keys.c.scopes, keys.c.last_used_at).where(
        keys.c.key_hash == sa.bindparam("h"), keys.c.revoked_at.is_(None))

    def lookup() -> object:
        with engine.connect() as conn:
            return conn.execute(query, {"h": key_hash}).mappings().first()

    return lookup


def measure(state, sa_url: str | None, n: int) -> dict[str, dict[str, float]]:  # noqa: ANN001
    from llmlb import auth

    key, _ = auth.create_api_key(state, "bench", "api")
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    deadline = time.monotonic() + 10
    while state.engine.version("keys") is None and time.monotonic() < deadline:
        time.sleep(0.05)  # PostgreSQL: the listener must be up before the cache is used
    sql = ("SELECT id, name, scopes, last_used_at FROM api_keys WHERE key_hash = ? AND "
           "revoked_at IS NULL")
    out = {"cached": timed(lambda: state.keys.active(key_hash), n),
           "hand-written": timed(lambda: state.engine.execute(sql, (key_hash,)).fetchone(), n)}
    if sa_url:
        out["SQLAlchemy Core"] = timed(sqlalchemy_lookup(sa_url, key_hash), n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--sqlalchemy", default=None, help="folder holding sqlalchemy")
    args = parser.parse_args()
    if args.sqlalchemy:
        sys.path.insert(0, args.sqlalchemy)

    from llmlb.state import open_database
    from tests.postgres import Postgres

    work = WORK_ROOT / "state_lookup"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {}
    state = open_database(work / "llmlb.db")
    try:
        results["sqlite"] = measure(state, args.sqlalchemy and f"sqlite:///{work}/llmlb.db",
                                    args.n)
    finally:
        state.close()
    pg = Postgres.start()
    try:
        url = pg.new_database()
        state = open_database(url)
        try:
            sa_url = url.replace("postgresql://", "postgresql+psycopg://")
            results["postgresql"] = measure(state, args.sqlalchemy and sa_url, args.n)
        finally:
            state.close()
    finally:
        pg.destroy()
    for engine, rows in results.items():
        for way, figures in rows.items():
            print(f"{engine:11} {way:16} p50 {figures['p50_us']:8.1f} µs   "
                  f"p99 {figures['p99_us']:8.1f} µs")
    save_summary("state_lookup", {"machine": machine_info(), "n": args.n, "results": results},
                 indent=2)


if __name__ == "__main__":
    main()

"""The shared SQLite database: its schema follows the migrations, whatever version a file is
at, and keeps what it holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from llmlb import auth
from llmlb.db import MIGRATIONS, Database


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_an_old_database_loses_the_unused_events_table_and_keeps_its_keys(tmp_path: Path,
                                                                         ) -> None:
    path = tmp_path / "llmlb.db"
    with sqlite3.connect(path) as conn:  # a database as the first four versions left it
        for version, script in enumerate(MIGRATIONS[:4], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version={version}")
        conn.execute("INSERT INTO api_keys(name, prefix, key_hash, scopes, created_at) "
                     "VALUES ('old', 'sk-old', 'hash', 'api', 0)")
    assert "events" in tables(path)
    db = Database(path)
    try:
        assert [k.name for k in auth.list_api_keys(db)] == ["old"]
        assert db.conn().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        db.close()
    assert "events" not in tables(path)
    assert {"api_keys", "users", "registrations", "nodes"} <= tables(path)

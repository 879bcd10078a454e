"""The SQLite database every worker process shares (WAL mode): keys, users, sessions' login
throttle, registrations (pulls), Hugging Face stats, small settings, the balancer's node
registry, the request history, stored responses and model aliases. One connection per
thread; schema versions in ``user_version``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .private_files import private_database, private_dir

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS api_keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE TABLE IF NOT EXISTS users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS registrations (
        model_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        error TEXT,
        requested_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at REAL NOT NULL,
        payload TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS hf_stats (
        repo_id TEXT PRIMARY KEY,
        downloads INTEGER,
        likes INTEGER,
        ok INTEGER NOT NULL,
        fetched_at REAL NOT NULL,
        claimed_at REAL
    );
    """,
    # Sessions end server-side (logout, new password); logins are throttled (sessions.py,
    # logins.py).
    """
    ALTER TABLE users ADD COLUMN session_version INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS login_failures_key_at ON login_failures(key, at);
    """,
    # The balancer's registry: nodes (and, later, endpoints) by name, their last report and
    # cooldown; which node pulls a model nobody has yet (one pull per model per cluster).
    """
    CREATE TABLE IF NOT EXISTS nodes (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL DEFAULT 'node',
        url TEXT NOT NULL,
        secret TEXT,
        report TEXT NOT NULL DEFAULT '{}',
        registered_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        cooldown_until REAL NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE IF NOT EXISTS pulls (
        model_id TEXT PRIMARY KEY,
        node_id INTEGER NOT NULL,
        assigned_at REAL NOT NULL
    );
    ALTER TABLE registrations ADD COLUMN node TEXT;
    """,
    # External endpoints are rows of ``nodes`` (kind 'endpoint') whose API key is kept as a
    # credential: "env:NAME" or "fernet:TOKEN" (balancer/credentials.py). One row per
    # request served (history.py), written in batches.
    """
    ALTER TABLE nodes ADD COLUMN credential TEXT;
    CREATE TABLE IF NOT EXISTS requests (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        key_name TEXT,
        operation TEXT NOT NULL,
        model TEXT,
        node TEXT,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        tokens_in INTEGER,
        tokens_out INTEGER,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS requests_at ON requests(at);
    """,
    # /ws/models events are derived from the shared state by a watcher (events.py), never
    # stored: the events table was never read or written.
    """
    DROP TABLE IF EXISTS events;
    """,
    # Stored responses of the Responses API (response_store.py): the response object and
    # the whole input it answered, so that previous_response_id can continue from it.
    """
    CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        model TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        input TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS responses_expires_at ON responses(expires_at);
    """,
    # Model aliases (aliases.py): a name agents use, standing for a list of models.
    """
    CREATE TABLE IF NOT EXISTS aliases (
        name TEXT PRIMARY KEY,
        models TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
)


class Database:
    """A SQLite file shared by processes; ``conn()`` gives this thread's connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.parent.exists():
            private_dir(path.parent)
        private_database(path)  # 0600 before SQLite creates it (and its -wal/-shm) as 0644
        self._local = threading.local()
        self._migrate()

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: writers queue on SQLite's lock instead of failing mid-way."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        # Workers start together: switching a new file to WAL needs it to themselves (SQLite
        # answers "database is locked" at once instead of waiting), so the first setup runs
        # under a file lock. WAL is a property of the file; later connections inherit it.
        lock_path = self.path.with_name(self.path.name + ".init-lock")
        with os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.conn().execute("PRAGMA journal_mode=WAL")
            with self.transaction() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in filter(str.strip, script.split(";")):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={i}")

    def get_meta(self, key: str) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def setdefault_meta(self, key: str, value: str) -> str:
        """Store value unless the key exists; return what is stored (same in every worker)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

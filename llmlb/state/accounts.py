"""Who may call: API keys, dashboard users with their session versions, failed logins, and
the small settings kept in ``meta``. The SQL only; what it means is in ``auth.py``,
``sessions.py`` and ``logins.py``.

The key of every request and the session of every dashboard request are read through a
per-worker cache (``engine.Cached``) that a change to keys or users empties everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from .engine import Cached, Engine, Row, StateUnavailable

KEYS, USERS = "keys", "users"
#: a key's limits (``limits.py``), columns of its row
LIMIT_COLUMNS = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens", "models")


class Meta:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, key: str) -> str | None:
        row = self.engine.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def setdefault(self, key: str, value: str) -> str:
        """Store value unless the key exists; return what is stored (the same everywhere)."""
        with self.engine.transaction() as tx:
            tx.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                       "DO NOTHING", (key, value))
            return tx.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]


class Keys:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._active = Cached(engine, KEYS)

    def insert(self, name: str, prefix: str, key_hash: str, scopes: str, now: float,
               limits: Sequence = (None,) * len(LIMIT_COLUMNS)) -> int:
        """``limits``: the values of ``LIMIT_COLUMNS``."""
        with self.engine.transaction() as tx:
            row = tx.execute(f"INSERT INTO api_keys (name, prefix, key_hash, scopes, created_at, "
                             f"{', '.join(LIMIT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, "
                             f"{', '.join('?' * len(LIMIT_COLUMNS))}) RETURNING id",
                             (name, prefix, key_hash, scopes, now, *limits)).fetchone()
            tx.changed(KEYS)  # a key unknown a moment ago (and cached as such) exists now
        return row["id"]

    def get(self, key_id: int) -> Row | None:
        return self.engine.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()

    def set_limits(self, key_id: int, limits: Sequence) -> bool:
        """Change an active key's limits (the values of ``LIMIT_COLUMNS``); every worker's
        cache forgets the key."""
        with self.engine.transaction() as tx:
            done = tx.execute(f"UPDATE api_keys SET "
                              f"{', '.join(c + ' = ?' for c in LIMIT_COLUMNS)} WHERE id = ? "
                              f"AND revoked_at IS NULL", (*limits, key_id)).rowcount == 1
            tx.changed(KEYS)
        return done

    def all(self) -> list[Row]:
        return self.engine.execute("SELECT * FROM api_keys ORDER BY id").fetchall()

    def revoke(self, key_id: int, now: float) -> bool:
        with self.engine.transaction() as tx:
            done = tx.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND "
                              "revoked_at IS NULL", (now, key_id)).rowcount == 1
            tx.changed(KEYS)
        return done

    def active(self, key_hash: str) -> Row | None:
        """The active key with this hash (id, name, scopes, last_used_at, its limits), or
        None."""
        return self._active.get(key_hash, lambda: self.engine.execute(
            f"SELECT id, name, scopes, last_used_at, {', '.join(LIMIT_COLUMNS)} FROM api_keys "
            "WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)).fetchone())

    def touch(self, key_hash: str, key_id: int, now: float) -> None:
        """Record a use (best effort: a request never fails for its bookkeeping)."""
        self._active.update(key_hash, lambda row: row and Row({**row, "last_used_at": now}))
        with contextlib.suppress(StateUnavailable):
            self.engine.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                                (now, key_id))


class Users:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._versions = Cached(engine, USERS)

    def create(self, username: str, password_hash: str, now: float) -> bool:
        """Create unless the name exists; True when created."""
        with self.engine.transaction() as tx:
            created = tx.execute("INSERT INTO users (username, password_hash, created_at) "
                                 "VALUES (?, ?, ?) ON CONFLICT (username) DO NOTHING",
                                 (username, password_hash, now)).rowcount == 1
            tx.changed(USERS)
        return created

    def set_password(self, username: str, password_hash: str) -> bool:
        """A new password ends every session of the user."""
        with self.engine.transaction() as tx:
            done = tx.execute("UPDATE users SET password_hash = ?, session_version = "
                              "session_version + 1 WHERE username = ?",
                              (password_hash, username)).rowcount == 1
            tx.changed(USERS)
        return done

    def all(self) -> list[Row]:
        return self.engine.execute("SELECT username, created_at FROM users ORDER BY id"
                                   ).fetchall()

    def delete(self, username: str) -> bool | None:
        """Delete a user, which ends their sessions: True; False when there is no such user;
        None when it is the last one (kept). Two deletes at once cannot leave none."""
        with self.engine.transaction() as tx:
            tx.lock("users")
            if tx.execute("SELECT 1 AS one FROM users WHERE username = ?",
                          (username,)).fetchone() is None:
                return False
            if tx.execute("SELECT COUNT(*) AS n FROM users").fetchone()["n"] <= 1:
                return None
            tx.execute("DELETE FROM users WHERE username = ?", (username,))
            tx.changed(USERS)
        return True

    def password_hash(self, username: str) -> str | None:
        row = self.engine.execute("SELECT password_hash FROM users WHERE username = ?",
                                  (username,)).fetchone()
        return row["password_hash"] if row else None

    def exist(self) -> bool:
        return self.engine.execute("SELECT 1 AS one FROM users LIMIT 1").fetchone() is not None

    def session_version(self, username: str) -> int | None:
        row = self._versions.get(username, lambda: self.engine.execute(
            "SELECT session_version FROM users WHERE username = ?", (username,)).fetchone())
        return None if row is None else row["session_version"]

    def end_sessions(self, username: str) -> None:
        with self.engine.transaction() as tx:
            tx.execute("UPDATE users SET session_version = session_version + 1 WHERE "
                       "username = ?", (username,))
            tx.changed(USERS)


class LoginFailures:
    """Failed logins per key ("client:…", "user:…") over a sliding window."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def begin(self, keys: Sequence[str], now: float, window: float, limit: int) -> float:
        """0 when no key has ``limit`` failures within the window: the attempt is then
        counted as a failure of each key, in the same transaction. Else the seconds until
        the oldest of the last ``limit`` failures leaves the window."""
        with self.engine.transaction() as tx:
            for key in sorted(keys):  # in one order everywhere: two attempts never deadlock
                tx.lock(f"login:{key}")
            tx.execute("DELETE FROM login_failures WHERE at < ?", (now - window,))
            wait = 0.0
            for key in keys:
                recent = tx.execute("SELECT at FROM login_failures WHERE key = ? ORDER BY at "
                                    "DESC LIMIT ?", (key, limit)).fetchall()
                if len(recent) >= limit:
                    wait = max(wait, recent[-1]["at"] + window - now)
            if wait > 0:
                return wait
            tx.executemany("INSERT INTO login_failures (key, at) VALUES (?, ?)",
                           [(key, now) for key in keys])
        return 0.0

    def count(self, key: str, since: float) -> int:
        return self.engine.execute("SELECT COUNT(*) AS n FROM login_failures WHERE key = ? "
                                   "AND at >= ?", (key, since)).fetchone()["n"]

    def clear(self, keys: Sequence[str]) -> None:
        with self.engine.transaction() as tx:
            tx.executemany("DELETE FROM login_failures WHERE key = ?", [(key,) for key in keys])

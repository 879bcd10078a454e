"""Throttling of dashboard logins (SC-6). No Flask here.

Failures are counted per client address and per user name over a sliding window, in SQLite so
that every gunicorn worker counts the same ones. An attempt is recorded as a failure *before*
the password is checked, in the same transaction as the count, so parallel attempts cannot
slip past the limit together; a successful login then clears the client's and the user's
failures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .db import Database

MAX_KEY_CHARS = 256  # a user name is client input: bound what lands in the table


@dataclass(frozen=True)
class LoginThrottle:
    db: Database
    max_failures: int
    window_seconds: float

    @staticmethod
    def _keys(client: str, username: str) -> tuple[str, str]:
        return f"client:{client}"[:MAX_KEY_CHARS], f"user:{username}"[:MAX_KEY_CHARS]

    def begin_attempt(self, client: str, username: str, now: float | None = None) -> float:
        """0 when the attempt may go ahead (it is counted as a failure until ``succeeded``),
        else the seconds to wait before the client or the user may try again."""
        now = time.time() if now is None else now
        keys = self._keys(client, username)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM login_failures WHERE at < ?", (now - self.window_seconds,))
            wait = 0.0
            for key in keys:
                recent = conn.execute(
                    "SELECT at FROM login_failures WHERE key=? ORDER BY at DESC LIMIT ?",
                    (key, self.max_failures)).fetchall()
                if len(recent) >= self.max_failures:
                    # Free again once the oldest of the last max_failures leaves the window.
                    wait = max(wait, recent[-1][0] + self.window_seconds - now)
            if wait > 0:
                return wait
            conn.executemany("INSERT INTO login_failures(key, at) VALUES (?, ?)",
                             [(key, now) for key in keys])
        return 0.0

    def failures(self, client: str, username: str, now: float | None = None) -> int:
        """The larger of the client's and the user's failures within the window."""
        now = time.time() if now is None else now
        return max(self.db.conn().execute(
            "SELECT COUNT(*) FROM login_failures WHERE key=? AND at >= ?",
            (key, now - self.window_seconds)).fetchone()[0]
            for key in self._keys(client, username))

    def succeeded(self, client: str, username: str) -> None:
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM login_failures WHERE key=?",
                             [(key,) for key in self._keys(client, username)])

"""Dashboard logins (SC-6): a password is checked only behind a throttle, and every failure
is logged with the user name and client address (never the password). No Flask here.

Failures are counted per client address and per user name over a sliding window, in the
shared state so that every worker of every balancer counts the same ones. An attempt is
recorded as a failure *before* the password is checked, in the same transaction as the count
(``state.accounts.LoginFailures``), so parallel attempts cannot slip past the limit together;
a successful login then clears the client's and the user's failures.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from .auth import Principal, check_login
from .state import State

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 256  # a user name is client input: bound what lands in the table


@dataclass(frozen=True)
class LoginThrottle:
    db: State
    max_failures: int
    window_seconds: float

    @staticmethod
    def _keys(client: str, username: str) -> tuple[str, str]:
        return f"client:{client}"[:MAX_KEY_CHARS], f"user:{username}"[:MAX_KEY_CHARS]

    def begin_attempt(self, client: str, username: str, now: float | None = None) -> float:
        """0 when the attempt may go ahead (it is counted as a failure until ``succeeded``),
        else the seconds to wait before the client or the user may try again."""
        now = time.time() if now is None else now
        return self.db.logins.begin(self._keys(client, username), now, self.window_seconds,
                                    self.max_failures)

    def failures(self, client: str, username: str, now: float | None = None) -> int:
        """The larger of the client's and the user's failures within the window."""
        now = time.time() if now is None else now
        return max(self.db.logins.count(key, now - self.window_seconds)
                   for key in self._keys(client, username))

    def succeeded(self, client: str, username: str) -> None:
        self.db.logins.clear(self._keys(client, username))


@dataclass(frozen=True)
class LoginOutcome:
    principal: Principal | None  # None: wrong user name or password, or throttled
    retry_after: int = 0  # seconds, when throttled


def attempt_login(throttle: LoginThrottle, client: str, username: str, password: str, *,
                  dev: bool) -> LoginOutcome:
    wait = math.ceil(throttle.begin_attempt(client, username))
    if wait:
        log.warning("Login refused for user %r from %s: too many failed logins; next try "
                    "in %d s", username, client, wait)
        return LoginOutcome(None, wait)
    principal = check_login(throttle.db, username, password, dev=dev)
    if principal is None:
        log.warning("Failed login for user %r from %s (%d of %d allowed in %.0f s)", username,
                    client, throttle.failures(client, username), throttle.max_failures,
                    throttle.window_seconds)
        return LoginOutcome(None)
    throttle.succeeded(client, username)
    log.info("User %r logged in from %s", principal.name, client)
    return LoginOutcome(principal)

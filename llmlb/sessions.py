"""Dashboard sessions (SC-3): what a login puts in the signed session cookie, and when that
cookie stops counting. No Flask here: callers pass the session's mapping.

The cookie is signed, not stored, so ending it needs state on the server: each user has a
``session_version`` in the database, copied into the cookie at login and compared on every use.
Logging out or changing the password bumps it, which ends every session of that user in every
worker at once. A development-mode login (``admin`` / ``test``) is marked as such and counts
only while development mode is on, so it never turns into the real ``admin`` after a restart
without ``--dev``. A session ends ``LLMLB_SESSION_LIFETIME_SECONDS`` after its login, however
busy it is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .auth import DEV_USERNAME, SCOPES, Principal
from .state import State

CLOCK_SKEW = 60.0  # workers on one host agree on the time; allow a little slack anyway


def login_fields(db: State, principal: Principal, now: float | None = None,
                 ) -> dict[str, Any]:
    """What the session holds after ``principal`` logged in."""
    fields: dict[str, Any] = {"user": principal.name, "login_at": time.time() if now is None
                              else now}
    if principal.kind == "dev":
        fields["dev"] = True
    else:
        fields["sv"] = _version(db, principal.name)
    return fields


def session_principal(db: State, data: Mapping[str, Any], *, dev: bool, lifetime: float,
                      now: float | None = None) -> Principal | None:
    """Who the session acts as, or None when it is not (or no longer) a valid login."""
    user, login_at = data.get("user"), data.get("login_at")
    if not isinstance(user, str) or not isinstance(login_at, int | float):
        return None
    now = time.time() if now is None else now
    if not login_at - CLOCK_SKEW <= now <= login_at + lifetime:
        return None
    if data.get("dev"):
        if dev and user == DEV_USERNAME:
            return Principal("dev", DEV_USERNAME, frozenset(SCOPES))
        return None
    version = _version(db, user)
    if version is None or data.get("sv") != version:
        return None
    return Principal("user", user, frozenset(SCOPES))


def end_sessions(db: State, username: str) -> None:
    """End every session of the user (logout, or a password set by an admin)."""
    db.users.end_sessions(username)


def _version(db: State, username: str) -> int | None:
    return db.users.session_version(username)

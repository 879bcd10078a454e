"""API keys (hashed, with scopes) and dashboard users (hashed passwords). No Flask here.

Keys are 256-bit random strings, so one SHA-256 is the right hash: it allows a direct lookup
and cannot be brute-forced. Passwords are low-entropy and get werkzeug's salted slow hash;
every way of setting one (the first admin, ``llmlb users``) asks for ``MIN_PASSWORD_LENGTH``
characters. Every user is an admin, so the last one cannot be deleted: that would lock
everyone out of the dashboard.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from werkzeug.security import check_password_hash, generate_password_hash

from .config import MIN_PASSWORD_LENGTH
from .limits import NO_LIMITS, Limits, Quota
from .state import State

log = logging.getLogger(__name__)

SCOPES = ("api", "node", "admin")
DEV_API_KEY = "sk_debug"
DEV_USERNAME, DEV_PASSWORD = "admin", "test"
_LAST_USED_EVERY = 60.0  # seconds between last_used_at writes for one key
_MAX_ID = 2**63 - 1  # the largest id either engine stores (SQLite rowid, BIGINT)


class UserError(ValueError):
    """A user operation refused; the message says why and what to do."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    kind: str  # "key" | "user" | "dev"
    name: str
    scopes: frozenset[str]
    key_id: int | None = None
    quota: Quota | None = None  # a key's limits; None: it has none (nothing to check)

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class KeyRecord:
    id: int
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: float
    last_used_at: float | None
    revoked: bool
    limits: Limits = NO_LIMITS


@functools.lru_cache(maxsize=4096)  # the same few keys on every request; sprayed ones push out
def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_scopes(scopes: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        items = scopes.split(",")
    elif isinstance(scopes, list | tuple) and all(isinstance(s, str) for s in scopes):
        items = list(scopes)
    else:
        raise ValueError(f"scopes must be a list of names; got {scopes!r}")
    cleaned = tuple(sorted({s.strip() for s in items if s.strip()}))
    unknown = [s for s in cleaned if s not in SCOPES]
    if unknown or not cleaned:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {scopes!r}")
    return cleaned


def create_api_key(db: State, name: str, scopes: str | list[str],
                   limits: Limits = NO_LIMITS) -> tuple[str, KeyRecord]:
    """Create a key; the plaintext is returned once and never stored."""
    scope_tuple = parse_scopes(scopes)
    key = "sk-" + secrets.token_urlsafe(32)
    now = time.time()
    key_id = db.keys.insert(name, key[:10], _hash_key(key), ",".join(scope_tuple), now,
                            limits.columns())
    return key, KeyRecord(key_id, name, key[:10], scope_tuple, now, None, False, limits)


def _record(r) -> KeyRecord:  # noqa: ANN001 - a state Row
    return KeyRecord(r["id"], r["name"], r["prefix"], tuple(r["scopes"].split(",")),
                     r["created_at"], r["last_used_at"], r["revoked_at"] is not None,
                     Limits.from_row(r))


def list_api_keys(db: State) -> list[KeyRecord]:
    return [_record(r) for r in db.keys.all()]


def get_api_key(db: State, key_id: int) -> KeyRecord | None:
    if not 0 < key_id <= _MAX_ID:
        return None
    row = db.keys.get(key_id)
    return _record(row) if row is not None else None


def set_key_limits(db: State, key_id: int, limits: Limits) -> KeyRecord | None:
    """Change an active key's limits (in force in every worker of every balancer within
    2 seconds); None when there is no such active key."""
    if not 0 < key_id <= _MAX_ID or not db.keys.set_limits(key_id, limits.columns()):
        return None
    return get_api_key(db, key_id)


def revoke_api_key(db: State, key_id: int) -> bool:
    """Revoke a key: refused by every worker of every balancer within 2 seconds."""
    if not 0 < key_id <= _MAX_ID:  # no such row can exist (and the database would raise)
        return False
    return db.keys.revoke(key_id, time.time())


def same_secret(given: str, expected: str) -> bool:
    """Compare secrets in constant time. As bytes: ``compare_digest`` refuses str with
    non-ASCII characters, and whatever a client sends must be an answer, not a 500."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


def authenticate_key(db: State, key: str, *, dev: bool = False) -> Principal | None:
    """The key's principal (from this worker's cache while no key changed), or None."""
    if dev and same_secret(key, DEV_API_KEY):
        return Principal("dev", "sk_debug", frozenset(SCOPES))
    key_hash = _hash_key(key)
    row = db.keys.active(key_hash)
    if row is None:
        return None
    now = time.time()
    if row["last_used_at"] is None or now - row["last_used_at"] > _LAST_USED_EVERY:
        db.keys.touch(key_hash, row["id"], now)
    return _principal_of(row)


# What each key row means, per worker: the keys' cache hands out the same row object until
# the key changes (or its last use is written), so a request of a known key builds nothing,
# and a limited key's ``Limits`` stay one object, whose checks are remembered on it.
_PRINCIPALS: dict[int, tuple[object, Principal]] = {}
_PRINCIPALS_KEPT = 10_000


def _principal_of(row) -> Principal:  # noqa: ANN001 - a key row (state.accounts.Keys.active)
    kept = _PRINCIPALS.get(id(row))
    if kept is not None and kept[0] is row:  # the row held here: its id is not reused
        return kept[1]
    limits = Limits.from_row(row)
    principal = Principal("key", row["name"], frozenset(row["scopes"].split(",")), row["id"],
                          Quota(row["id"], row["name"], limits) if limits else None)
    if len(_PRINCIPALS) >= _PRINCIPALS_KEPT:  # rows of keys long changed: start over
        _PRINCIPALS.clear()
    _PRINCIPALS[id(row)] = (row, principal)
    return principal


def key_from_headers(headers) -> str | None:  # noqa: ANN001 - any Mapping of headers
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return (headers.get("X-API-Key") or "").strip() or None


# --- users ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserRecord:
    username: str
    created_at: float


def check_password(password: str) -> None:
    """Raise UserError unless the password is long enough to be one."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def check_username(username: str) -> None:
    if not username or len(username) > 64 or not username.isprintable() \
            or username != username.strip():
        raise UserError(f"a user name is 1-64 printable characters without surrounding "
                        f"spaces, not {username!r}")


def create_user(db: State, username: str, password: str) -> bool:
    """Create a user unless the name exists; True when created."""
    check_username(username)
    check_password(password)
    return db.users.create(username, generate_password_hash(password), time.time())


def set_password(db: State, username: str, password: str) -> bool:
    """Change an existing user's password (False: no such user); every session of the user
    ends with the old one."""
    check_password(password)
    return db.users.set_password(username, generate_password_hash(password))


def list_users(db: State) -> list[UserRecord]:
    return [UserRecord(r["username"], r["created_at"]) for r in db.users.all()]


def delete_user(db: State, username: str) -> bool:
    """Delete a user (False: no such user), which ends their sessions; the last user is
    refused (UserError)."""
    deleted = db.users.delete(username)
    if deleted is None:
        raise UserError(f"'{username}' is the last user: every user is an admin, and "
                        "without one nobody can log in to the dashboard. Create another "
                        "first (llmlb users create NAME)")
    return deleted


@functools.cache
def _dummy_hash() -> str:
    return generate_password_hash(secrets.token_urlsafe(16))


def check_login(db: State, username: str, password: str, *, dev: bool = False,
                ) -> Principal | None:
    if dev and username == DEV_USERNAME and same_secret(password, DEV_PASSWORD):
        return Principal("dev", DEV_USERNAME, frozenset(SCOPES))
    stored = db.users.password_hash(username)
    # An unknown user costs the same slow hash as a known one: the answer's timing must not
    # tell which user names exist.
    if not check_password_hash(stored or _dummy_hash(), password) or stored is None:
        return None
    return Principal("user", username, frozenset(SCOPES))


def ensure_first_admin(db: State, username: str, password: str | None) -> str | None:
    """Create the first admin when there is no user yet.

    Returns the generated password when one was made (to print once), else None. Safe to call
    from every worker: only the one whose insert wins creates the user.
    """
    if db.users.exist():
        return None
    generated = None if password else secrets.token_urlsafe(12)
    created = create_user(db, username, password or generated)
    return generated if created else None

"""An external endpoint's API key, as the database keeps it: never in clear.

Two forms, stored in the ``credential`` column of its ``nodes`` row:

- ``env:NAME``: the key is read from the balancer's environment variable NAME whenever a
  connection is built (``llmlb endpoints add ... --api-key-env NAME``); the database holds
  only the name. Only names made for it may be read: ``LLMLB_ENDPOINT_KEY_*``, or those the
  operator lists in ``LLMLB_ENDPOINT_ENV_ALLOWLIST`` (``EnvAllowlist``). Anything else (an
  ``HF_TOKEN``, a cloud credential, the admin password) would go to whatever URL the
  endpoint has, as a bearer token; a stored name that is no longer allowed sends nothing.
- ``fernet:TOKEN``: the key itself, encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from
  ``cryptography``) under a key file ``$LLMLB_HOME/endpoints.key`` (0600, made on first use).
  A copy of the database alone does not reveal the key.

Neither form is ever sent back by the API (it says ``has_api_key``).

Balancers that share a PostgreSQL state must seal and open with one key, which the database
must not hold: each gets it from its operator, as ``LLMLB_ENDPOINTS_KEY`` (written into its
key file at start) or as the key file itself, copied. ``check_at_start`` refuses to start a
balancer on a shared state without it, or with another key than the one the others use (the
database holds a token sealed with that key: it tells whether two keys match, and nothing
about either).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken

from ..private_files import FILE_MODE

if TYPE_CHECKING:
    from ..state import State

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
ENV_PREFIX = "LLMLB_ENDPOINT_KEY_"
KEY_FILE = "endpoints.key"
CHECK_META = "endpoints_key_check"
_CHECK_TEXT = b"llmlb endpoints key"


@dataclass(frozen=True)
class EnvAllowlist:
    """The environment variables an endpoint's key may be read from: ``LLMLB_ENDPOINT_KEY_*``
    and the names listed in ``LLMLB_ENDPOINT_ENV_ALLOWLIST``."""

    names: tuple[str, ...] = ()

    def allows(self, name: str) -> bool:
        return (name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)) \
            or name in self.names

    def refusal(self, name: str) -> str:
        return (f"llmlb reads endpoint keys only from environment variables named "
                f"{ENV_PREFIX}<something> or listed in LLMLB_ENDPOINT_ENV_ALLOWLIST; {name} "
                f"is neither (rename it, e.g. {ENV_PREFIX}{name.upper()}, or list it)")


class CredentialError(ValueError):
    """A stored credential that cannot be turned back into a key (the message says why)."""


def _fernet(home: Path) -> Fernet:
    path = home / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return Fernet(path.read_bytes().strip())
    with os.fdopen(fd, "wb") as f:  # the first worker to get here writes it, the rest read it
        f.write(Fernet.generate_key())
    return Fernet(path.read_bytes().strip())


def seal(home: Path, api_key: str) -> str:
    """The credential to store for a key given in clear."""
    return "fernet:" + _fernet(home).encrypt(api_key.encode()).decode()


def from_env(name: str) -> str:
    if not ENV_NAME.fullmatch(name):
        raise ValueError(f"not an environment variable name: {name!r}")
    return f"env:{name}"


def open_credential(home: Path, credential: str | None, allowlist: EnvAllowlist,
                    ) -> str | None:
    """The key in clear (None: no key). Raises CredentialError for a key that is gone, or
    an environment variable that may not be read."""
    if not credential:
        return None
    kind, _, value = credential.partition(":")
    if kind == "env":
        if not allowlist.allows(value):
            raise CredentialError(allowlist.refusal(value))
        key = os.environ.get(value)
        if not key:
            raise CredentialError(f"the environment variable {value} is not set")
        return key
    if kind == "fernet":
        try:
            return _fernet(home).decrypt(value.encode()).decode()
        except (InvalidToken, ValueError, OSError) as exc:
            raise CredentialError(f"the stored API key cannot be decrypted with "
                                  f"{home / KEY_FILE} ({type(exc).__name__})") from None
    raise CredentialError(f"unknown credential form {kind!r}")


def check_at_start(home: Path, key: str | None, state: State) -> None:
    """Install ``key`` (LLMLB_ENDPOINTS_KEY) as this balancer's key file, and make sure that
    every balancer of a shared state seals with the same one. Raises SettingsError."""
    from ..config import SettingsError

    path = home / KEY_FILE
    if key is not None:
        try:
            Fernet(key.encode())
        except ValueError:
            raise SettingsError("LLMLB_ENDPOINTS_KEY must be a Fernet key: 32 random bytes in "
                                "URL-safe base64 (python -c 'from cryptography.fernet import "
                                "Fernet; print(Fernet.generate_key().decode())')") from None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            if path.read_bytes().strip() != key.strip().encode():
                raise SettingsError(f"LLMLB_ENDPOINTS_KEY differs from the key in {path}: "
                                    "remove the file, or unset the variable") from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(key.strip().encode())
    if not path.exists():
        if state.shared:
            raise SettingsError(
                f"a balancer on a shared database ({state.description}) needs the key that "
                f"seals endpoints' API keys, the same on every balancer: set "
                f"LLMLB_ENDPOINTS_KEY, or copy {KEY_FILE} from another balancer to {path}")
        return  # SQLite: made on first use, as ever
    fernet = _fernet(home)
    token = state.setdefault_meta(CHECK_META, fernet.encrypt(_CHECK_TEXT).decode())
    try:
        fernet.decrypt(token.encode())
    except InvalidToken:
        raise SettingsError(f"the key in {path} is not the one the other balancers on "
                            f"{state.description} seal endpoints' API keys with: give every "
                            f"balancer the same LLMLB_ENDPOINTS_KEY or {KEY_FILE}") from None


def describe(credential: str | None) -> dict:
    """What the API may say about a credential: whether there is one, and an env var's name."""
    if not credential:
        return {"has_api_key": False}
    kind, _, value = credential.partition(":")
    return {"has_api_key": True, "api_key_env": value if kind == "env" else None}

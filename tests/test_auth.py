"""API keys with scopes, the first admin, and development mode (AP-3)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest
import requests

from llmlb import auth

from .conftest import LiveServer, llmlb_command, open_test_state


def make_key(server: LiveServer, scopes: str) -> str:
    key, _ = auth.create_api_key(server.runtime.db, f"test-{scopes}", scopes)
    return key


@pytest.fixture
def prod(make_server, engine: str) -> LiveServer:
    """A production-mode server, on each state engine."""
    return make_server(dev=False, admin_password="s3cret-pass")


def test_no_key_wrong_key_and_missing_scope(prod: LiveServer) -> None:
    url = f"{prod.url}/v1/models"
    r = requests.get(url, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.get(url, headers={"Authorization": "Bearer sk-wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["message"] == "Invalid API key"

    node_key = make_key(prod, "node")
    r = requests.get(url, headers={"Authorization": f"Bearer {node_key}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"

    api_key = make_key(prod, "api")
    assert requests.get(url, headers={"Authorization": f"Bearer {api_key}"},
                        timeout=10).status_code == 200
    assert requests.get(url, headers={"X-API-Key": api_key}, timeout=10).status_code == 200
    # an inference key cannot manage keys
    r = requests.get(f"{prod.url}/api/keys", headers={"X-API-Key": api_key}, timeout=10)
    assert r.status_code == 403


def test_openai_sdk_with_a_created_key(prod: LiveServer) -> None:
    key = make_key(prod, "api")
    assert prod.client(api_key=key).models.list().data == []
    with pytest.raises(openai.AuthenticationError):
        prod.client(api_key="sk-nope").models.list()


def test_dev_key_only_in_dev_mode(prod: LiveServer, make_server) -> None:
    r = requests.get(f"{prod.url}/v1/models", headers={"Authorization": "Bearer sk_debug"},
                     timeout=10)
    assert r.status_code == 401
    dev = make_server(dev=True)
    r = requests.get(f"{dev.url}/v1/models", headers={"Authorization": "Bearer sk_debug"},
                     timeout=10)
    assert r.status_code == 200


def test_keys_are_stored_hashed_and_revocable(prod: LiveServer) -> None:
    admin = make_key(prod, "admin")
    headers = {"Authorization": f"Bearer {admin}"}
    r = requests.post(f"{prod.url}/api/keys", json={"name": "ci", "scopes": ["api"]},
                      headers=headers, timeout=10)
    assert r.status_code == 201
    created = r.json()
    assert created["key"].startswith("sk-") and created["scopes"] == ["api"]
    assert created["key"] not in repr(prod.runtime.db.keys.all())
    if not prod.runtime.db.shared:  # the SQLite file itself, its journal included
        raw_db = b"".join(p.read_bytes() for p in Path(prod.runtime.settings.database).parent
                          .glob("llmlb.db*") if p.is_file())
        assert created["key"].encode() not in raw_db
    listed = requests.get(f"{prod.url}/api/keys", headers=headers, timeout=10).json()["keys"]
    assert all("key" not in k for k in listed)
    r = requests.delete(f"{prod.url}/api/keys/{created['id']}", headers=headers, timeout=10)
    assert r.status_code == 200
    r = requests.get(f"{prod.url}/v1/models", headers={"X-API-Key": created["key"]}, timeout=10)
    assert r.status_code == 401
    for scopes in (["root"], 5, [1, 2]):
        r = requests.post(f"{prod.url}/api/keys", json={"name": "x", "scopes": scopes},
                          headers=headers, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "scopes"


def test_cli_creates_a_key_printed_once(llmlb_home: Path, make_server, engine: str) -> None:
    result = subprocess.run([*llmlb_command(), "keys", "create", "--name", "N", "--scope",
                             "api"], capture_output=True, text=True, check=True)
    key = result.stdout.strip()
    assert key.startswith("sk-") and "shown only this once" in result.stderr
    listing = subprocess.run([*llmlb_command(), "keys", "list"], capture_output=True,
                             text=True, check=True).stdout
    assert "N" in listing and key not in listing
    server = make_server(dev=False)
    assert server.client(api_key=key).models.list().data == []


def test_first_admin_password_generated_once(llmlb_home: Path, make_server, engine: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    make_server(dev=False)
    generated = [r.getMessage() for r in caplog.records if "first admin" in r.getMessage()]
    assert len(generated) == 1
    password = generated[0].split("password: ")[1].split()[0]
    db = open_test_state(llmlb_home)
    assert auth.check_login(db, "admin", password) is not None
    assert auth.check_login(db, "admin", "wrong") is None
    db.close()
    caplog.clear()
    make_server(dev=False)  # a restart (or a second worker) never prints it again
    assert not [r for r in caplog.records if "first admin" in r.getMessage()]


def test_first_admin_from_environment(llmlb_home: Path, make_server, engine: str) -> None:
    make_server(dev=False, admin_username="root", admin_password="from-env-pw")
    db = open_test_state(llmlb_home)
    assert auth.check_login(db, "root", "from-env-pw") is not None
    assert auth.check_login(db, "admin", "test") is None  # no default secret outside dev
    assert auth.check_login(db, "admin", "test", dev=True) is not None
    db.close()


def test_status_shows_the_local_path_to_admins_only(prod: LiveServer) -> None:
    model = prod.models_dir / "tiny"
    model.mkdir()
    (model / "model.gguf").write_bytes(b"GGUF")
    url = f"{prod.url}/v0/models/tiny/status"
    for scopes in ("api", "node"):
        body = requests.get(url, headers={"X-API-Key": make_key(prod, scopes)}, timeout=10).json()
        assert body["status"] == "local" and "local_path" not in body
        assert str(prod.models_dir) not in json.dumps(body)
    body = requests.get(url, headers={"X-API-Key": make_key(prod, "admin")}, timeout=10).json()
    assert body["local_path"] == str(model)


def test_revoking_a_key_id_beyond_any_integer_is_404(prod: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {make_key(prod, 'admin')}"}
    for key_id in ("99999999999999999999999", "9223372036854775808", "0"):
        r = requests.delete(f"{prod.url}/api/keys/{key_id}", headers=headers, timeout=10)
        assert r.status_code == 404, (key_id, r.text)
        assert r.json()["error"]["code"] == "key_not_found"
    result = users_cli("keys", "revoke", "99999999999999999999999")
    assert result.returncode == 1 and "no active key with id" in result.stderr


def users_cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess:
    """``llmlb ...`` as a user types it (a password typed twice at the prompt)."""
    typed = f"{password}\n{password}\n" if password is not None else None
    return subprocess.run([*llmlb_command(), *args], input=typed, capture_output=True,
                          text=True, timeout=60)


def test_users_cli_manages_users_without_surprises(prod: LiveServer, llmlb_home: Path) -> None:
    db = prod.runtime.db
    # A typo does not create a second admin: set-password changes existing users only.
    typo = users_cli("users", "set-password", "admn", password="a good passphrase")
    assert typo.returncode == 1 and "no user named 'admn'" in typo.stderr
    assert [u.username for u in auth.list_users(db)] == ["admin"]
    # A one-character password is refused, the old one stays.
    short = users_cli("users", "set-password", "admin", password="x")
    assert short.returncode == 1 and "at least 8 characters" in short.stderr
    assert auth.check_login(db, "admin", "s3cret-pass") is not None

    created = users_cli("users", "create", "alice", password="alice's passphrase")
    assert created.returncode == 0, created.stderr
    assert auth.check_login(db, "alice", "alice's passphrase") is not None
    again = users_cli("users", "create", "alice", password="another passphrase")
    assert again.returncode == 1 and "exists already" in again.stderr
    assert users_cli("users", "create", "bob", password="short").returncode == 1
    listing = users_cli("users", "list")
    assert listing.returncode == 0
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == [
        "USERNAME", "admin", "alice"]

    # Deleting a user ends their sessions at once; the last user cannot be deleted.
    from .conftest import dashboard_login

    alice = dashboard_login(prod.url, "alice's passphrase", username="alice").browser
    assert alice.get(f"{prod.url}/api/keys", timeout=10).status_code == 200
    assert users_cli("users", "delete", "alice").returncode == 0
    assert alice.get(f"{prod.url}/api/keys", timeout=10).status_code == 401
    last = users_cli("users", "delete", "admin")
    assert last.returncode == 1 and "last user" in last.stderr
    assert users_cli("users", "delete", "nobody").returncode == 1
    assert [u.username for u in auth.list_users(db)] == ["admin"]


def test_a_short_first_admin_password_is_refused(llmlb_home: Path) -> None:
    result = subprocess.run([*llmlb_command(), "serve", "--port", "0"], capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "LLMLB_ADMIN_PASSWORD": "1234567"})
    assert result.returncode != 0
    assert "LLMLB_ADMIN_PASSWORD must have at least 8 characters" in result.stderr
    assert "Traceback" not in result.stderr

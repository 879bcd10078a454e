"""The shared state on both engines: the schema follows the migrations whatever version a
database is at and keeps what it holds; every store behaves the same on SQLite and
PostgreSQL; a change made through one balancer's state reaches another's cache; several
balancers starting at once migrate once."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from llmlb import auth, sessions
from llmlb.aliases import Aliases
from llmlb.history import History, RequestRecord
from llmlb.logins import LoginThrottle
from llmlb.response_store import ResponseStore
from llmlb.state import State, open_database, schema

from .conftest import ENDPOINTS_KEY, ENGINES


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def old_sqlite(path: Path, version: int) -> None:
    """A database as llmlb left it at schema ``version``, with a key and a user."""
    with sqlite3.connect(path) as conn:
        for i, script in enumerate(schema.SQLITE[:version], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version={i}")
        conn.execute("INSERT INTO api_keys(name, prefix, key_hash, scopes, created_at) "
                     "VALUES ('old', 'sk-old', ?, 'api', 0)", (auth._hash_key("sk-old-key"),))


def test_an_old_database_loses_the_unused_events_table_and_keeps_its_keys(tmp_path: Path,
                                                                         ) -> None:
    path = tmp_path / "llmlb.db"
    old_sqlite(path, 4)
    assert "events" in tables(path)
    db = open_database(path)
    try:
        assert [k.name for k in auth.list_api_keys(db)] == ["old"]
        assert db.engine.schema_version() == len(schema.SQLITE)
    finally:
        db.close()
    assert "events" not in tables(path)
    assert {"api_keys", "users", "registrations", "nodes"} <= tables(path)


def test_a_database_of_the_last_release_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "llmlb.db"
    old_sqlite(path, 6)  # PRAGMA user_version 6: the schema before the state package
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO users(username, password_hash, created_at) VALUES (?, ?, 0)",
                     ("admin", auth.generate_password_hash("pw")))
    db = open_database(path)
    try:
        assert db.engine.schema_version() == len(schema.SQLITE) > 6
        principal = auth.authenticate_key(db, "sk-old-key")
        assert principal is not None and principal.name == "old"
        assert auth.check_login(db, "admin", "pw") is not None
    finally:
        db.close()


def test_usage_of_an_older_database_is_summed_per_key_model_and_node(tmp_path: Path) -> None:
    """Version 10 adds the usage sums per key, model and node that views without filters
    read: made from the roll-ups already there, they answer what the roll-ups add up to."""
    from llmlb import usage

    path = tmp_path / "llmlb.db"
    old_sqlite(path, 9)
    day = 86400 * 20_000
    rows = [(day + 3600 * h, key, model, node, *[(h + 1) * (i + 1) for i in
                                                  range(len(usage.COLUMNS))])
            for h in range(3) for key in ("a", "b") for model in ("m1", "m2") for node in ("x",)]
    names = ", ".join(("hour", "key_name", "model", "node", *usage.COLUMNS))
    with sqlite3.connect(path) as conn:
        conn.executemany(f"INSERT INTO usage_hourly ({names}) VALUES "
                         f"({', '.join('?' * (4 + len(usage.COLUMNS)))})", rows)
    db = open_database(path)
    try:
        assert db.engine.schema_version() == len(schema.SQLITE) >= 10
        for group in ("key", "model", "node", None):
            summed = usage.report(db.usage, bucket="hour", group=group, filters={},
                                  since=day, until=day + 86400)
            # the same view from the roll-ups themselves (a filter makes it add them up)
            added = usage.report(db.usage, bucket="hour", group=group, filters={"node": "x"},
                                 since=day, until=day + 86400)
            assert summed["data"] == added["data"] and summed["total"] == added["total"]
            assert summed["total"]["requests"] == sum(r[4] for r in rows) == 24
            assert len(summed["data"]) == 3 * {"key": 2, "model": 2, "node": 1, None: 1}[group]
    finally:
        db.close()


@pytest.fixture(params=ENGINES)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> State:
    target = (request.getfixturevalue("pg_url") if request.param == "postgresql"
              else tmp_path / "llmlb.db")
    opened = open_database(target)
    yield opened
    opened.close()


def test_every_store_behaves_the_same_on_both_engines(state: State) -> None:
    key, record = auth.create_api_key(state, "ci", "api,admin")
    assert auth.authenticate_key(state, key).scopes == {"api", "admin"}
    assert auth.authenticate_key(state, key + "x") is None
    assert [(k.id, k.name, k.revoked) for k in auth.list_api_keys(state)] == \
        [(record.id, "ci", False)]
    assert auth.revoke_api_key(state, record.id) and not auth.revoke_api_key(state, record.id)
    assert auth.authenticate_key(state, key) is None
    second, _ = auth.create_api_key(state, "next", "api")
    assert auth.list_api_keys(state)[-1].id > record.id

    assert auth.ensure_first_admin(state, "admin", "password-1") is None  # made with this one
    assert auth.check_login(state, "admin", "password-1") is not None
    fields = sessions.login_fields(state, auth.check_login(state, "admin", "password-1"))
    assert sessions.session_principal(state, fields, dev=False, lifetime=60) is not None
    assert auth.set_password(state, "admin", "password-2")
    assert sessions.session_principal(state, fields, dev=False, lifetime=60) is None
    assert not auth.create_user(state, "admin", "password-again")
    assert auth.create_user(state, "ann", "ann-password")
    fields = sessions.login_fields(state, auth.check_login(state, "ann", "ann-password"))
    assert [u.username for u in auth.list_users(state)] == ["admin", "ann"]
    assert auth.delete_user(state, "ann") and not auth.delete_user(state, "ann")
    assert sessions.session_principal(state, fields, dev=False, lifetime=60) is None
    with pytest.raises(auth.UserError, match="last user"):
        auth.delete_user(state, "admin")
    assert state.setdefault_meta("secret", "a") == "a" == state.setdefault_meta("secret", "b")

    throttle = LoginThrottle(state, max_failures=2, window_seconds=60)
    assert throttle.begin_attempt("10.0.0.1", "admin") == 0
    assert throttle.begin_attempt("10.0.0.1", "admin") == 0
    assert throttle.failures("10.0.0.1", "admin") == 2
    assert 0 < throttle.begin_attempt("10.0.0.1", "admin") <= 60
    throttle.succeeded("10.0.0.1", "admin")
    assert throttle.failures("10.0.0.1", "admin") == 0

    history = History(state, retention_days=1)
    for status, at in ((200, time.time()), (503, time.time()), (200, time.time() - 3 * 86400)):
        history.add(RequestRecord(at, "ci", "chat", "m", "n", status, True, 0.0015, 0.0005,
                                  3, 4, None))
    assert history.flush() == 3
    assert [r["status"] for r in history.query()] == [200, 503, 200]
    assert [r["status"] for r in history.query(status="5xx")] == [503]
    assert history.query(limit=1)[0]["stream"] is True
    history.prune()
    assert len(history.query()) == 2

    state.registrations.record("m", None, 1.0)
    state.registrations.record("m", "gpu-a", 2.0)
    assert state.registrations.models() == {"m": "gpu-a"}
    assert state.registrations.local() == []
    assert state.hf_stats.claim("org/repo", 100.0, 3600, 300, 60)
    assert not state.hf_stats.claim("org/repo", 101.0, 3600, 300, 60)  # claimed by us
    state.hf_stats.store("org/repo", 5, 6, True, 102.0)
    assert state.hf_stats.all()["org/repo"]["downloads"] == 5
    assert auth.authenticate_key(state, second) is not None

    responses = ResponseStore(state, retention_days=1)
    answer = {"id": "resp_1", "model": "m", "output": [{"type": "message", "text": "é"}]}
    responses.put("key:1", answer, [{"role": "user", "content": "Hi"}])
    responses.put("key:1", answer, [{"role": "user", "content": "Hi again"}])  # replaced
    stored = responses.get("resp_1", "key:1")
    assert stored.response == answer and stored.input == [{"role": "user", "content": "Hi again"}]
    assert responses.get("resp_1", "key:2") is None  # another key's: not there
    assert not responses.delete("resp_1", "key:2")
    assert responses.delete("resp_1", "key:1") and responses.get("resp_1", "key:1") is None
    expired = ResponseStore(state, retention_days=-1)
    expired.put("key:1", {"id": "resp_old"}, [])
    assert expired.get("resp_old", "key:1") is None
    expired.prune()
    assert state.engine.execute("SELECT id FROM responses").fetchall() == []

    aliases = Aliases(state)
    aliases.set("gpt-4o", ["a", "b"])
    aliases.set("gpt-4o", ["c"])
    aliases.set("claude", ["d"])
    assert aliases.all() == {"claude": ["d"], "gpt-4o": ["c"]}
    assert aliases.resolve("gpt-4o") == ["c"] and aliases.resolve("c") is None
    assert aliases.remove("gpt-4o") and not aliases.remove("gpt-4o")
    assert aliases.resolve("gpt-4o") is None


def wait_for(condition, timeout: float = 10.0) -> float:  # noqa: ANN001
    """Seconds until ``condition()`` held (polling), or fail."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(params=ENGINES)
def two_balancers(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[State, State]:
    """The state as two balancers (or two workers) see it: two instances on one database."""
    target = (request.getfixturevalue("pg_url") if request.param == "postgresql"
              else tmp_path / "llmlb.db")
    one, two = open_database(target), open_database(target)
    yield one, two
    one.close()
    two.close()


def test_a_revoked_key_and_an_ended_session_reach_the_other_cache(two_balancers) -> None:
    one, two = two_balancers
    key, record = auth.create_api_key(one, "ci", "api")
    auth.create_user(one, "ann", "ann-password")
    fields = sessions.login_fields(one, auth.check_login(one, "ann", "ann-password"))
    wait_for(lambda: two.engine.version("keys") is not None)  # the other one listens
    assert auth.authenticate_key(two, key) is not None  # now in two's cache
    assert sessions.session_principal(two, fields, dev=False, lifetime=60) is not None
    auth.revoke_api_key(one, record.id)
    sessions.end_sessions(one, "ann")
    assert wait_for(lambda: auth.authenticate_key(two, key) is None) < 2.0
    assert wait_for(lambda: sessions.session_principal(
        two, fields, dev=False, lifetime=60) is None) < 2.0
    # A key made on one is known to the other at once, though two had cached it as unknown.
    new = "sk-" + "n" * 43
    assert auth.authenticate_key(two, new) is None
    one.keys.insert("new", new[:10], auth._hash_key(new), "api", time.time())
    assert wait_for(lambda: auth.authenticate_key(two, new) is not None) < 2.0


def test_an_alias_set_or_removed_reaches_the_other_cache(
        two_balancers, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = Aliases(two_balancers[0]), Aliases(two_balancers[1])
    wait_for(lambda: two_balancers[1].engine.version("aliases") is not None)
    assert two.resolve("gpt-4o") is None  # now in two's cache
    one.set("gpt-4o", ["m"])
    assert wait_for(lambda: two.resolve("gpt-4o") == ["m"]) < 2.0
    statements = []
    real = two_balancers[1].engine.execute
    monkeypatch.setattr(two_balancers[1].engine, "execute",
                        lambda *a: statements.append(a) or real(*a))
    for _ in range(100):  # nothing changed: no round trip
        assert two.resolve("gpt-4o") == ["m"]
    assert statements == []
    one.remove("gpt-4o")
    assert wait_for(lambda: two.resolve("gpt-4o") is None) < 2.0


def test_hosted_provider_rows_follow_the_keys_balancers_hold(two_balancers) -> None:
    """Each balancer makes the rows of the providers it has keys for; one without a key leaves
    the row of a shared state to the balancers that have it, and forgets it in a state of its
    own (SQLite: a balancer alone)."""
    from llmlb.balancer.registry import NodeRegistry

    one, two = (NodeRegistry(s, timeout=10, cooldown=1, cooldown_max=10) for s in two_balancers)
    one.sync_providers({"anthropic": "http://127.0.0.1:9/v1"})
    one.sync_providers({"anthropic": "http://127.0.0.1:9/v1"})  # again: one row
    assert [(r.name, r.kind) for r in two.nodes(fresh=True)] == [("anthropic", "provider")]
    two.sync_providers({"openai": "http://127.0.0.1:9/v1"})
    kept = {r.name for r in one.nodes(fresh=True)}
    assert kept == ({"anthropic", "openai"} if two_balancers[0].shared else {"openai"})


def test_a_known_key_is_read_from_the_cache_while_nothing_changes(
        two_balancers, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = two_balancers
    wait_for(lambda: two.engine.version("keys") is not None)  # two listens
    before = two.engine.version("keys")
    key, _ = auth.create_api_key(one, "ci", "api")
    wait_for(lambda: two.engine.version("keys") != before)  # the notice of it came
    assert auth.authenticate_key(two, key) is not None
    statements = []
    real = two.engine.execute
    monkeypatch.setattr(two.engine, "execute", lambda *a: statements.append(a) or real(*a))
    for _ in range(200):
        assert auth.authenticate_key(two, key) is not None
    assert statements == []
    auth.create_api_key(one, "other", "api")  # any change to keys: two reads again, once
    wait_for(lambda: auth.authenticate_key(two, key) is not None and len(statements) == 1)


def test_balancers_starting_together_migrate_once(pg_url: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmlb")
    opened: list[State] = []
    failures: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(open_database(pg_url))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not failures and len(opened) == 6
        assert [s.engine.schema_version() for s in opened] == [len(schema.POSTGRES)] * 6
        migrated = [r for r in caplog.records if "migrated to schema version" in r.getMessage()]
        assert len(migrated) == len(schema.POSTGRES)
        auth.create_api_key(opened[0], "one", "api")
        assert len(auth.list_api_keys(opened[5])) == 1
    finally:
        for s in opened:
            s.close()


def test_db_copy_moves_an_sqlite_state_to_postgresql(llmlb_home: Path, make_server,
                                                     pg_url: str) -> None:
    """Keys keep working, logins too, the history comes along; a target that holds state is
    not overwritten without --force."""
    import subprocess

    import openai
    import requests

    from .conftest import dashboard_login, llmlb_command

    old = make_server(dev=False, admin_password="pw-before-copy")
    key, _ = auth.create_api_key(old.runtime.db, "ci", "api")
    with pytest.raises(openai.NotFoundError):  # a request the history records
        old.client(api_key=key).chat.completions.create(model="nope", messages=[
            {"role": "user", "content": "hi"}])
    old.runtime.history.flush()
    old.runtime.balancer.aliases.set("gpt-4o", ["m"])
    ResponseStore(old.runtime.db, 1).put("key:1", {"id": "resp_1"}, [])
    old.stop()

    copy = [*llmlb_command(), "db", "copy", "--to", pg_url]
    done = subprocess.run(copy, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 api_keys" in done.stdout and "1 requests" in done.stdout

    new = make_server(dev=False, database_url=pg_url, endpoints_key=ENDPOINTS_KEY)
    assert new.runtime.db.shared
    assert new.client(api_key=key).models.list().data == []
    assert dashboard_login(new.url, "pw-before-copy").status_code == 302
    rows = requests.get(f"{new.url}/v0/requests", headers={"Authorization": f"Bearer {key}"},
                        timeout=10)
    assert rows.status_code == 403  # an api key may not read it; an admin key may:
    admin, _ = auth.create_api_key(new.runtime.db, "admin", "admin")
    history = requests.get(f"{new.url}/v0/requests", timeout=10,
                           headers={"Authorization": f"Bearer {admin}"}).json()["data"]
    assert [r["key_name"] for r in history][-1:] == ["ci"]
    assert new.runtime.balancer.aliases.resolve("gpt-4o") == ["m"]
    assert ResponseStore(new.runtime.db, 1).get("resp_1", "key:1") is not None

    again = subprocess.run(copy, capture_output=True, text=True)
    assert again.returncode != 0 and "already holds state" in again.stderr
    assert "api_keys" in again.stderr
    forced = subprocess.run([*copy, "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert auth.authenticate_key(new.runtime.db, admin) is None  # replaced by the copy
    assert auth.authenticate_key(new.runtime.db, key) is not None


def test_one_pull_per_model_across_balancers(state: State, tmp_path: Path) -> None:
    """Balancers (here: eight instances of the state on one database) asking at once which
    node pulls a model all get the same answer."""
    from llmlb.balancer.registry import NodeRegistry

    target = state.engine.url if state.shared else state.engine.path
    instances = [open_database(target) for _ in range(8)]
    registries = [NodeRegistry(s, timeout=15, cooldown=1, cooldown_max=60) for s in instances]
    barrier = threading.Barrier(len(registries))
    answers: list[int] = []

    def ask(i: int) -> None:
        barrier.wait()
        answers.append(registries[i].assign_pull(f"model-{tmp_path.name}", i + 1,
                                                 set(range(1, 9))))

    try:
        for _ in range(5):
            answers.clear()
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(set(answers)) == 1, answers
            state.engine.execute("DELETE FROM pulls")
    finally:
        for s in instances:
            s.close()


def test_one_owner_per_node_name_across_balancers(state: State, tmp_path: Path) -> None:
    """Eight nodes, each with its own secret, register one name at once, each at its own
    balancer (eight instances of the state on one database): one of them gets the name,
    every other is refused, and the name stays with the one that got it."""
    from llmlb.balancer.registry import NameTaken, NodeRegistry
    from llmlb.balancer.reports import NodeReport

    target = state.engine.url if state.shared else state.engine.path
    instances = [open_database(target) for _ in range(8)]
    registries = [NodeRegistry(s, timeout=15, cooldown=1, cooldown_max=60) for s in instances]
    barrier = threading.Barrier(len(registries))
    outcomes: dict[int, str] = {}

    def register(i: int, name: str) -> None:
        barrier.wait()
        try:
            registries[i].register(name, f"http://127.0.0.1:{9000 + i}", NodeReport(),
                                   secret=f"secret-{i}" * 4)
            outcomes[i] = "registered"
        except NameTaken:
            outcomes[i] = "refused"

    try:
        for round_ in range(5):
            name = f"gpu-{round_}"
            outcomes.clear()
            threads = [threading.Thread(target=register, args=(i, name)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, outcome in outcomes.items() if outcome == "registered"]
            assert len(winners) == 1 and len(outcomes) == 8, outcomes
            owner = winners[0]
            stored = registries[owner].get(name)
            assert stored.url == f"http://127.0.0.1:{9000 + owner}"
            assert registries[owner].heartbeat(name, f"secret-{owner}" * 4, NodeReport())
            with pytest.raises(NameTaken):
                registries[(owner + 1) % 8].heartbeat(name, f"secret-{owner + 1}" * 4,
                                                      NodeReport())
        assert registries[0].remove("gpu-0") and registries[1].get("gpu-0") is None
    finally:
        for s in instances:
            s.close()

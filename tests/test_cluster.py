"""Several balancers, one state (HA-1..HA-3): `llmlb serve --role balancer` processes on one
PostgreSQL database, with a node, an endpoint and nginx in front, as an operator runs them;
the database restarted and a balancer killed under load."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import psycopg
import pytest
import requests

from llmlb.auth import create_api_key
from llmlb.config import SettingsError
from llmlb.state import open_database

from .conftest import (
    CLOSED_ENDPOINT,
    ENDPOINTS_KEY,
    HELLO,
    Proc,
    dashboard_login,
    free_port,
    llmlb_command,
)
from .fake_openai import FakeOpenAI
from .postgres import Postgres
from .test_balancer import FAST, install_model
from .test_plugins import SLOW_ENGINE, write_plugin

PASSWORD = "correct horse battery"


@dataclass
class Balancers:
    db_url: str
    admin: str
    api: str
    node_key: str
    start: Callable[[], Proc]
    start_node: Callable[..., Proc]
    procs: list[Proc] = field(default_factory=list)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api}"}

    def chat(self, url: str, model: str, key: str | None = None) -> requests.Response:
        return requests.post(f"{url}/v1/chat/completions", headers=self.headers(key),
                             json={"model": model, "messages": HELLO, "max_tokens": 2},
                             timeout=30)

    def leader(self) -> int | None:
        """The pid of the process that holds the cluster's leader lock, if any."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND "
                "a.application_name LIKE 'llmlb leader %' AND a.datname = current_database()"
            ).fetchone()
        return int(row[0].split()[-1]) if row else None

    def owner(self, pid: int) -> Proc | None:
        """The balancer whose gunicorn runs the process ``pid`` (None: a dead one's)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        parent = int(stat[stat.rfind(")") + 2:].split()[1])
        return next((p for p in self.procs if p.process.pid in (pid, parent)), None)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def balancers(start_process, pg_url: str, tmp_path: Path, tiny) -> Iterator[Balancers]:
    state = open_database(pg_url)
    admin, _ = create_api_key(state, "admin", "admin")
    api, _ = create_api_key(state, "client", "api")
    node_key, _ = create_api_key(state, "nodes", "node")
    state.close()
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "slow", SLOW_ENGINE)
    made = Balancers(pg_url, admin, api, node_key, lambda: None, lambda: None)

    def start(**env: str) -> Proc:
        port = free_port()
        proc = start_process(
            [*llmlb_command(), "serve", "--role", "balancer", "--port", str(port)],
            {"LLMLB_HOME": str(tmp_path / f"balancer-{len(made.procs)}"),
             "LLMLB_DATABASE_URL": pg_url, "LLMLB_ENDPOINTS_KEY": ENDPOINTS_KEY,
             "HF_ENDPOINT": CLOSED_ENDPOINT, "LLMLB_ADMIN_PASSWORD": PASSWORD,
             "LLMLB_PLUGINS_DIR": str(plugins), "LLMLB_ENDPOINT_CHECK_SECONDS": "1", **FAST,
             **env}, port)
        made.procs.append(proc)
        return proc

    def start_node(name: str, balancer_urls: list[str], **env: str) -> Proc:
        home = tmp_path / name
        install_model(home / "models", "snail", "slow:0.001")
        port = free_port()
        return start_process(
            [*llmlb_command(), "node", "--balancer-url", ",".join(balancer_urls), "--name",
             name, "--port", str(port), "--host", "127.0.0.1"],
            {"LLMLB_HOME": str(home), "HF_ENDPOINT": CLOSED_ENDPOINT,
             "LLMLB_NODE_API_KEY": node_key, "LLMLB_PLUGINS_DIR": str(plugins), **FAST,
             **env}, port)

    made.start, made.start_node = start, start_node
    yield made


def test_two_balancers_act_as_one(balancers: Balancers) -> None:
    one, two = balancers.start(), balancers.start()
    balancers.start_node("gpu-a", [one.url])
    with FakeOpenAI("hosted") as fake:
        added = requests.post(f"{one.url}/v0/endpoints", headers=balancers.headers(
            balancers.admin), json={"name": "hosted", "base_url": fake.url}, timeout=30)
        assert added.status_code == 201, added.text
        # A node registered with one, an endpoint added on one: both route to each.
        for b in (one, two):
            wait_for(lambda b=b: balancers.chat(b.url, "snail").status_code == 200, 30,
                     "the node routed")
            answer = balancers.chat(b.url, "snail")
            assert answer.headers["X-LLMLB-Node"] == "gpu-a"
            answer = balancers.chat(b.url, "fake-model")
            assert answer.status_code == 200 and answer.headers["X-LLMLB-Node"] == "hosted"

        # Removed on one: gone from the other within 2 s.
        removed = requests.delete(f"{one.url}/v0/endpoints/hosted", timeout=10,
                                  headers=balancers.headers(balancers.admin))
        assert removed.status_code == 200
        assert wait_for(lambda: balancers.chat(two.url, "fake-model").status_code == 404,
                        10, "endpoint removal seen") < 2.0

    # A key revoked on one: refused by the other within 2 s.
    made = requests.post(f"{one.url}/api/keys", json={"name": "ci", "scopes": ["api"]},
                         headers=balancers.headers(balancers.admin), timeout=10).json()
    assert requests.get(f"{two.url}/v1/models", headers=balancers.headers(made["key"]),
                        timeout=10).status_code == 200
    assert requests.delete(f"{one.url}/api/keys/{made['id']}", timeout=10,
                           headers=balancers.headers(balancers.admin)).status_code == 200
    assert wait_for(lambda: requests.get(f"{two.url}/v1/models", timeout=10, headers=(
        balancers.headers(made["key"]))).status_code == 401, 10, "revocation seen") < 2.0

    # A login on one is a login on the other; a logout on one ends it on both within 2 s.
    login = dashboard_login(one.url, PASSWORD)
    assert login.status_code == 302, login.text
    cookie = {"session": login.browser.cookies["session"]}
    assert requests.get(f"{two.url}/api/keys", cookies=cookie, timeout=10).status_code == 200
    page = login.browser.get(f"{one.url}/keys", timeout=10).text
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    login.browser.post(f"{one.url}/logout", data={"csrf_token": csrf}, timeout=10)
    assert wait_for(lambda: requests.get(f"{two.url}/api/keys", cookies=cookie,
                                         timeout=10).status_code == 401,
                    10, "logout seen") < 2.0


def test_two_balancers_share_stored_responses_and_aliases(balancers: Balancers) -> None:
    """The agents' state (AG-1, AG-5) is the cluster's: a response stored through one balancer
    is continued, read and deleted through the other; an alias set or removed on one is
    routed by the other at once (its workers' caches told by NOTIFY)."""
    one, two = balancers.start(), balancers.start()
    admin = balancers.headers(balancers.admin)
    with FakeOpenAI("plain", ("plain-model",)) as fake:
        added = requests.post(f"{one.url}/v0/endpoints", headers=admin, timeout=30,
                              json={"name": "plain", "base_url": fake.url})
        assert added.status_code == 201, added.text
        for b in (one, two):
            wait_for(lambda b=b: balancers.chat(b.url, "plain-model").status_code == 200, 30,
                     "the endpoint routed")
        client_one, client_two = (openai.OpenAI(base_url=f"{b.url}/v1", api_key=balancers.api,
                                                max_retries=0) for b in (one, two))

        # An alias set on one balancer is routed by the other.
        put = requests.put(f"{one.url}/v0/aliases/gpt-4o", headers=admin, timeout=10,
                           json={"models": ["plain-model"]})
        assert put.status_code == 200, put.text
        assert wait_for(lambda: balancers.chat(two.url, "gpt-4o").status_code == 200, 10,
                        "the alias seen") < 2.0

        # A response stored through one is continued through the other.
        first = client_one.responses.create(model="gpt-4o", input="Hi")
        assert first.output_text == "hello from plain"
        follow = client_two.responses.create(model="plain-model", input="And then?",
                                             previous_response_id=first.id)
        assert follow.previous_response_id == first.id
        assert [m["content"] for m in fake.calls[-1]["messages"]] == [
            "Hi", "hello from plain", "And then?"]
        assert client_two.responses.retrieve(first.id).output_text == "hello from plain"
        # ... and deleted through it: gone for both.
        client_two.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client_one.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            client_one.responses.create(model="plain-model", input="More",
                                        previous_response_id=first.id)

        # An alias removed on the other: gone for the first.
        removed = requests.delete(f"{two.url}/v0/aliases/gpt-4o", headers=admin, timeout=10)
        assert removed.status_code == 200, removed.text
        assert wait_for(lambda: balancers.chat(one.url, "gpt-4o").status_code == 404, 10,
                        "the alias removal seen") < 2.0


def test_periodic_work_moves_when_its_holder_is_killed(balancers: Balancers) -> None:
    balancers.start()
    balancers.start()
    wait_for(balancers.leader, 30, "a leader elected")
    holder = balancers.owner(balancers.leader())
    survivor = next(p for p in balancers.procs if p is not holder)
    node = balancers.start_node("gpu-a", [survivor.url])
    wait_for(lambda: balancers.chat(survivor.url, "snail").status_code == 200, 30,
             "the node routed")

    os.killpg(holder.process.pid, signal.SIGKILL)
    took = wait_for(lambda: (pid := balancers.leader()) is not None
                    and balancers.owner(pid) is survivor, 30, "the other balancer leads")
    # The work itself runs there now: the node-watch task notices a node gone.
    time.sleep(1.5)
    node.stop(signal.SIGKILL)
    wait_for(lambda: "Node gpu-a is offline" in survivor.log(), 30, "node-watch runs")
    print(f"periodic work moved in {took:.1f} s")


def test_a_node_given_several_balancers_moves_on_when_one_dies(balancers: Balancers) -> None:
    """`llmlb node --balancer-url A,B,C`: the node registers with the first that answers
    (the first is a closed port here), sends its heartbeats there, and when that balancer
    dies moves on to the next: the node stays online and routed."""
    one, two = balancers.start(), balancers.start()
    node = balancers.start_node("gpu-a", [CLOSED_ENDPOINT, one.url, two.url])
    wait_for(lambda: balancers.chat(two.url, "snail").status_code == 200, 60,
             "the node routed")
    assert f"Registered with the balancer {one.url} as node 'gpu-a'" in node.log()

    def heartbeat_at_two() -> float:
        rows = requests.get(f"{two.url}/v0/nodes", headers=balancers.headers(balancers.admin),
                            timeout=10).json()["data"]
        row = next(r for r in rows if r["name"] == "gpu-a")
        assert row["status"] == "online", row  # never offline on the way
        return row["last_heartbeat"]

    os.killpg(one.process.pid, signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: f"Heartbeats go to the balancer {two.url}" in node.log(), 30,
             "the node moved on")
    # Past the node timeout (3 s) since the kill, still heard from, online and routed.
    wait_for(lambda: heartbeat_at_two() > killed + 4, 30, "heartbeats at the other")
    answer = balancers.chat(two.url, "snail")
    assert answer.status_code == 200 and answer.headers["X-LLMLB-Node"] == "gpu-a"


def load(url: str, headers: dict[str, str], stop: threading.Event,
         seen: list[tuple[float, float, str, int, str]], model: str) -> None:
    """Ask again and again (a POST to the model, a GET of the models), recording each
    answer: start, end, method, status, error code."""
    session = requests.Session()
    while not stop.is_set():
        for method in ("POST", "GET"):
            started = time.monotonic()
            try:
                if method == "POST":
                    r = session.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                                     json={"model": model, "messages": HELLO, "max_tokens": 2})
                else:
                    r = session.get(f"{url}/v1/models", headers=headers, timeout=30)
                try:
                    code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 \
                        else ""
                except ValueError:  # nginx's own 502 page
                    code = "not JSON"
                if r.status_code == 503:
                    assert r.headers.get("Retry-After"), r.text
                seen.append((started, time.monotonic(), method, r.status_code, code))
            except requests.RequestException as exc:
                seen.append((started, time.monotonic(), method, 0, type(exc).__name__))


def under_load(url: str, headers: dict[str, str], model: str, action: Callable[[], None],
               threads: int = 4, after: float = 3.0) -> tuple[list, float, float]:
    stop, seen = threading.Event(), []
    workers = [threading.Thread(target=load, args=(url, headers, stop, seen, model))
               for _ in range(threads)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    began = time.monotonic()
    action()
    ended = time.monotonic()
    time.sleep(after)
    stop.set()
    for w in workers:
        w.join()
    return seen, began, ended


def test_a_balancer_killed_behind_nginx_costs_no_request(balancers: Balancers, nginx) -> None:
    one, two = balancers.start(), balancers.start()
    proxy = nginx([int(one.url.rsplit(":", 1)[1]), int(two.url.rsplit(":", 1)[1])])
    with FakeOpenAI("hosted") as fake:
        assert requests.post(f"{one.url}/v0/endpoints", json={"name": "hosted", "base_url":
                             fake.url}, headers=balancers.headers(balancers.admin),
                             timeout=30).status_code == 201
        wait_for(lambda: all(balancers.chat(b.url, "fake-model").status_code == 200
                             for b in (one, two)), 30, "both route to the endpoint")
        seen, killed, _ = under_load(proxy.url, balancers.headers(), "fake-model",
                                     lambda: os.killpg(one.process.pid, signal.SIGKILL))
    failed = [s for s in seen if s[3] != 200]
    # What may fail: a POST nginx had already handed to the balancer as it died (not retried:
    # it may have started the work), and an answer cut half-way. Only around the kill, at
    # most one per client; everything after is answered.
    assert all(s[2] == "POST" and s[3] == 502 or s[4] == "ChunkedEncodingError"
               for s in failed), failed
    assert all(abs(s[0] - killed) < 1.0 for s in failed) and len(failed) <= 4, failed
    settled = max((s[1] for s in failed), default=killed)
    assert [s for s in seen if s[0] > settled and s[3] != 200] == []
    assert len([s for s in seen if s[0] > settled]) > 20
    print(f"{len(seen)} requests, {len(failed)} cut by the kill: {failed}")


def test_postgresql_restarting_under_load(balancers: Balancers, postgres: Postgres) -> None:
    # Longer than the outage (as the default 15 s is): nodes and endpoints stay online.
    one = balancers.start(LLMLB_NODE_TIMEOUT_SECONDS="30")
    with FakeOpenAI("hosted") as fake:
        assert requests.post(f"{one.url}/v0/endpoints", json={"name": "hosted", "base_url":
                             fake.url}, headers=balancers.headers(balancers.admin),
                             timeout=30).status_code == 201
        wait_for(lambda: balancers.chat(one.url, "fake-model").status_code == 200, 30,
                 "routed")

        def restart_slowly() -> None:
            postgres.restart()  # pg_ctl restart: every connection cut
            time.sleep(1)
            postgres.stop()  # and down for a while, as a crash and recovery would be
            time.sleep(3)
            postgres.start_server()

        seen, began, ended = under_load(one.url, balancers.headers(), "fake-model",
                                        restart_slowly, after=8.0)
    statuses = collections.Counter((s[3], s[4]) for s in seen)
    print(f"restart took {ended - began:.1f} s: {dict(statuses)}")
    assert set(statuses) <= {(200, ""), (503, "state_unavailable")}, statuses
    assert statuses[(200, "")] > 20 and statuses[(503, "state_unavailable")] > 0
    # Service resumed by itself: the last seconds are all answered.
    assert all(s[3] == 200 for s in seen if s[0] > ended + 5), statuses
    assert all(s[1] - s[0] < 10 for s in seen)  # nobody hung waiting for the database
    # The history of the requests answered while it was away was kept and written.
    answered = len([s for s in seen if s[2] == "POST" and s[3] == 200])
    admin = balancers.headers(balancers.admin)

    def history() -> int:
        rows = requests.get(f"{one.url}/v0/requests?limit=1000&status=200", headers=admin,
                            timeout=10).json()["data"]
        return len([r for r in rows if r["operation"] == "chat"])

    wait_for(lambda: history() >= answered, 20, "history written")


def test_a_balancer_on_postgresql_needs_the_key_sealing_endpoint_keys(
        make_server, pg_url: str, tmp_path: Path) -> None:
    """The database alone must not open endpoints' API keys, so every balancer gets the key
    from its operator — and one that lacks it, or has another, says so at start."""
    refused = subprocess.run(
        [*llmlb_command(), "serve", "--role", "balancer", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "LLMLB_HOME": str(tmp_path / "bare"), "LLMLB_DATABASE_URL": pg_url})
    assert refused.returncode != 0 and "LLMLB_ENDPOINTS_KEY" in refused.stderr
    with pytest.raises(SettingsError, match="LLMLB_ENDPOINTS_KEY"):
        make_server(role="balancer", database_url=pg_url)

    one = make_server(role="balancer", database_url=pg_url, endpoints_key=ENDPOINTS_KEY,
                      home=tmp_path / "one")
    with pytest.raises(SettingsError, match="not the one the other balancers"):
        make_server(role="balancer", database_url=pg_url, home=tmp_path / "wrong",
                    endpoints_key="0" * 43 + "=")
    two = make_server(role="balancer", database_url=pg_url, endpoints_key=ENDPOINTS_KEY,
                      home=tmp_path / "two")
    with FakeOpenAI("hosted", api_key="sk-upstream-secret") as fake:
        added = requests.post(f"{one.url}/v0/endpoints", headers={
            "Authorization": "Bearer sk_debug"}, timeout=30, json={
            "name": "hosted", "base_url": fake.url, "api_key": "sk-upstream-secret"})
        assert added.status_code == 201, added.text
        wait_for(lambda: two.client().chat.completions.with_raw_response.create(
            model="fake-model", messages=HELLO).headers["X-LLMLB-Node"] == "hosted", 10,
            "the other balancer opens the endpoint's key")

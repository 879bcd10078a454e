"""Per-key limits (QT-1, QT-2), from the outside with the `openai` SDK: requests at once,
requests and tokens per minute, daily tokens, the models a key may use, OpenAI's rate-limit
headers (and the SDK backing off on them), limits that hold across two gunicorn workers on
SQLite and two balancers on PostgreSQL, and a killed worker's lease coming back."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import psutil
import pytest
import requests

from llmlb import errors
from llmlb.auth import create_api_key
from llmlb.limiter import Limiter
from llmlb.limits import Limits, Quota
from llmlb.state import State

from .conftest import (
    CLOSED_ENDPOINT,
    ENDPOINTS_KEY,
    HELLO,
    Proc,
    free_port,
    llmlb_command,
    open_test_state,
)
from .fake_openai import FakeOpenAI
from .test_db import state  # noqa: F401 - an open state, on each engine

ENDPOINT_FAST = {"role": "balancer", "endpoint_check_seconds": 0.2, "cooldown_seconds": 0.5,
                 "cooldown_max_seconds": 10}
ADMIN = {"Authorization": "Bearer sk_debug"}


def add_endpoint(url: str, fake: FakeOpenAI, headers: dict[str, str] = ADMIN) -> None:
    r = requests.post(f"{url}/v0/endpoints", headers=headers, timeout=30,
                      json={"name": fake.name, "base_url": fake.url})
    assert r.status_code == 201, r.text


def new_key(url: str, name: str, headers: dict[str, str] = ADMIN, **limits) -> str:
    r = requests.post(f"{url}/api/keys", headers=headers, timeout=30,
                      json={"name": name, "scopes": ["api"], **limits})
    assert r.status_code == 201, r.text
    assert {k: v for k, v in r.json()["limits"].items() if v is not None} == limits
    return r.json()["key"]


def client(url: str, key: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key,
                         max_retries=kwargs.pop("max_retries", 0), timeout=60, **kwargs)


def chat(url: str, key: str, model: str = "fake-model", stream: bool = False) -> int:
    """Send one chat request; its status (a stream read to its end)."""
    try:
        if stream:
            for _ in client(url, key).chat.completions.create(model=model, messages=HELLO,
                                                              stream=True):
                pass
        else:
            client(url, key).chat.completions.create(model=model, messages=HELLO)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


def at_once(n: int, send: Callable[[int], int]) -> list[int]:
    """``n`` requests released together; their statuses."""
    gate = threading.Barrier(n)

    def one(i: int) -> int:
        gate.wait(timeout=60)
        return send(i)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# --- in one process, on both engines -------------------------------------------------------

def test_max_concurrent_never_lets_a_fourth_through(engine: str, make_server, fakes) -> None:
    fake = fakes(latency=0.6, token_delay=0.1)
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    key = new_key(server.url, "three", max_concurrent=3)

    statuses = at_once(8, lambda i: chat(server.url, key, stream=i % 2 == 0))
    assert fake.max_concurrent == 3, fake.max_concurrent
    assert statuses.count(200) >= 3 and set(statuses) <= {200, 429}, statuses
    # Every slot came back (streams included): three more fit, and never a fourth.
    fake.max_concurrent = 0
    statuses = at_once(8, lambda i: chat(server.url, key, stream=i % 2 == 1))
    assert fake.max_concurrent == 3 and statuses.count(200) >= 3, statuses

    # A client that leaves in the middle of a stream gives its slot back too.
    fake.token_delay = 0.3
    for _ in range(3):
        stream = client(server.url, key).chat.completions.create(
            model="fake-model", messages=HELLO, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.monotonic() + 30
    while chat(server.url, key) != 200:
        assert time.monotonic() < deadline, "the slots of closed streams never came back"
        time.sleep(0.2)


def test_tokens_per_minute_and_per_day(engine: str, make_server, fakes) -> None:
    fake = fakes(tokens=5)  # each answer: 5 prompt + 5 completion tokens
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    per_minute = new_key(server.url, "tpm", tpm=25)
    per_day = new_key(server.url, "daily", daily_tokens=15)

    # 10 tokens each, counted once the answer is known (streams too): 0, 10, 20 used before
    # the three answered requests; the fourth would start at 30 >= 25.
    assert [chat(server.url, per_minute, stream=i == 1) for i in range(4)] == [200] * 3 + [429]
    with pytest.raises(openai.RateLimitError) as refused:
        client(server.url, per_minute).chat.completions.create(model="fake-model",
                                                                messages=HELLO)
    body = refused.value.body
    assert body["code"] == "rate_limit_exceeded" and body["param"] == "tpm", body
    assert "tokens per minute" in body["message"]
    headers = refused.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "25"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert 0 < int(headers["retry-after"]) <= 60

    assert [chat(server.url, per_day) for _ in range(3)] == [200, 200, 429]
    with pytest.raises(openai.RateLimitError) as refused:
        client(server.url, per_day).chat.completions.create(model="fake-model", messages=HELLO)
    assert refused.value.body["param"] == "daily_tokens"
    assert "tokens per day" in refused.value.body["message"]
    # The day ends at midnight UTC.
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 86400

    # Raised by an admin: the key works again at once, in every worker.
    keys = requests.get(f"{server.url}/api/keys", headers=ADMIN, timeout=30).json()["keys"]
    daily = next(k for k in keys if k["name"] == "daily")
    assert daily["use"]["daily_tokens"] == 20 and daily["limits"]["daily_tokens"] == 15
    r = requests.patch(f"{server.url}/api/keys/{daily['id']}", headers=ADMIN, timeout=30,
                       json={"daily_tokens": 100})
    assert r.status_code == 200 and r.json()["limits"]["daily_tokens"] == 100, r.text
    assert chat(server.url, per_day) == 200


def test_rate_limit_headers_and_the_sdk_backing_off(make_server, fakes) -> None:
    fake = fakes(token_delay=0.1, tokens=15)
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    key = new_key(server.url, "polite", rpm=50, tpm=10_000, max_concurrent=1)
    unlimited = new_key(server.url, "free")

    raw = client(server.url, key).chat.completions.with_raw_response.create(
        model="fake-model", messages=HELLO)
    assert raw.headers["x-ratelimit-limit-requests"] == "50"
    assert raw.headers["x-ratelimit-remaining-requests"] == "49"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "10000"  # counted after the answer
    raw = client(server.url, key).chat.completions.with_raw_response.create(
        model="fake-model", messages=HELLO)
    assert raw.headers["x-ratelimit-remaining-tokens"] == "9980"
    plain = client(server.url, unlimited).chat.completions.with_raw_response.create(
        model="fake-model", messages=HELLO)
    assert not [h for h in plain.headers if h.startswith("x-ratelimit")]

    # One stream holds the only slot: the SDK is told 429 with Retry-After, waits, retries.
    seen: list[int] = []
    hooks = {"response": [lambda response: seen.append(response.status_code)]}
    stream = client(server.url, key).chat.completions.create(model="fake-model", messages=HELLO,
                                                             stream=True)
    first = next(iter(stream))
    assert first.choices
    finisher = threading.Thread(target=lambda: [None for _ in stream])
    finisher.start()  # the stream ends in about 1.5 s
    patient = client(server.url, key, max_retries=5, http_client=httpx.Client(event_hooks=hooks))
    started = time.monotonic()
    answer = patient.chat.completions.create(model="fake-model", messages=HELLO)
    finisher.join()
    assert answer.choices[0].message.content
    assert seen[0] == 429 and seen[-1] == 200, seen
    assert time.monotonic() - started >= 1.0  # it waited out Retry-After: 1


def test_a_model_outside_the_key_list_is_403(engine: str, make_server, fakes) -> None:
    fake = fakes("gpu", "fake-model", "other-model")
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    key = new_key(server.url, "narrow", models=["fake-model"])
    assert chat(server.url, key) == 200
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(server.url, key).chat.completions.create(model="other-model", messages=HELLO)
    assert refused.value.status_code == 403
    assert refused.value.body["code"] == "model_not_allowed"
    assert "other-model" in refused.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client(server.url, key).embeddings.create(model="other-model", input="hi")
    with pytest.raises(openai.PermissionDeniedError):  # every dialect checks the list
        client(server.url, key).responses.create(model="other-model", input="hi")
    with pytest.raises(anthropic.PermissionDeniedError) as refused_messages:
        anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0).messages.create(
            model="other-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert refused_messages.value.body["error"]["type"] == "permission_error"
    assert "other-model" in refused_messages.value.body["error"]["message"]
    assert len(fake.calls) == 1


def key_use(url: str, name: str, headers: dict[str, str] = ADMIN) -> dict:
    keys = requests.get(f"{url}/api/keys", headers=headers, timeout=30).json()["keys"]
    return next(k for k in keys if k["name"] == name)["use"]


def test_a_key_far_from_its_limits_is_counted_exactly(engine: str, make_server,
                                                      fakes) -> None:
    """Far from every limit a worker reserves blocks of the key's budget and spends them
    without asking the state; what it did not spend goes back, and the counts come out
    exact: every request, every token, no slot left taken."""
    fake = fakes(tokens=5)  # 10 tokens an answer
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    key = new_key(server.url, "roomy", rpm=100_000, tpm=10**9, max_concurrent=1_000,
                  daily_tokens=10**10, monthly_tokens=10**11)
    quotas = server.runtime.balancer.limiter.quotas
    checks, check = [], quotas.admit
    quotas.admit = lambda *args: checks.append(1) or check(*args)  # counted, then done
    started = time.monotonic()
    sent = at_once(12, lambda i: sum(chat(server.url, key, stream=j % 3 == 0) == 200
                                     for j in range(10)))
    took = time.monotonic() - started
    assert sum(sent) == 120 and len(fake.calls) == 120
    # One check per block (up to 64 requests), not one per request that found it spent:
    # the first (one request, the count unknown), then a block at a time, each second anew.
    assert len(checks) <= 4 + math.ceil(took), (len(checks), took)
    # Right after, the worker still holds its block: slots reserved ahead, none running;
    # one block's worth at most (64 requests; 16 slots beyond the 12 that ran at once),
    # however many requests checked together.
    held = key_use(server.url, "roomy")
    assert 0 < held["max_concurrent"] <= 12 + 16 and 120 <= held["rpm"] <= 120 + 64, held
    deadline = time.monotonic() + 15
    while (use := key_use(server.url, "roomy")) != {
            "rpm": 120, "tpm": 1200, "max_concurrent": 0, "daily_tokens": 1200,
            "monthly_tokens": 1200}:
        assert time.monotonic() < deadline, use
        time.sleep(0.3)


def test_a_refused_check_ends_the_block_its_key_held(state: State) -> None:  # noqa: F811
    """Answers that end late (a stream's tokens counted after the next request began) let a
    second request spend the block the first one reserved; once a check finds the key over
    its limit, that block stops admitting: every request after the 429 is refused too."""
    limiter = Limiter(state.quotas, 60)
    quota = Quota(7, "daily", Limits(daily_tokens=15))
    try:
        first = limiter.admit(quota, "m")  # far from 15: a block is reserved
        second = limiter.admit(quota, "m")  # spent from it: the first has not ended yet
        first.finish(10)
        second.finish(10)
        for _ in range(3):  # 20 of 15 used: the check refuses, and so does every later one
            with pytest.raises(errors.APIError) as refused:
                limiter.admit(quota, "m")
            assert refused.value.status == 429 and refused.value.param == "daily_tokens"
    finally:
        limiter.close()
    assert state.quotas.current([7], time.time())[7]["day"] == 20


def test_blocks_never_let_more_than_the_limit_through(start_process, llmlb_home: Path,
                                                      fakes) -> None:
    """rpm 200 through two workers, 300 requests at once: each worker reserves blocks while
    the key is far from its limit and checks one request at a time near it (giving back what
    it held): exactly 200 answered, as with one check per request."""
    fake = fakes()
    admin = admin_key(llmlb_home)
    proc = serve(start_process, llmlb_home, "--workers", "2")
    add_endpoint(proc.url, fake, admin)
    key = new_key(proc.url, "two-hundred", admin, rpm=200)
    wait_serving(proc.url, key)
    burst = at_once(30, lambda i: sum(chat(proc.url, key) == 200 for _ in range(10)))
    assert sum(burst) == 200 and len(fake.calls) == 200, burst
    assert [chat(proc.url, key) for _ in range(3)] == [429] * 3
    assert len(fake.calls) == 200


def test_invalid_limits_are_refused(make_server) -> None:
    server = make_server(role="balancer")
    for bad in ({"rpm": -1}, {"tpm": "lots"}, {"max_concurrent": 1.5}, {"models": 3},
                {"daily_tokens": True}):
        r = requests.post(f"{server.url}/api/keys", headers=ADMIN, timeout=30,
                          json={"name": "x", **bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == next(iter(bad)), r.text
    r = requests.patch(f"{server.url}/api/keys/999", headers=ADMIN, timeout=30,
                       json={"rpm": 3})
    assert r.status_code == 404


# --- across processes ----------------------------------------------------------------------

def serve(start_process, home: Path, *extra: str, **env: str) -> Proc:
    port = free_port()
    return start_process(
        [*llmlb_command(), "serve", "--role", "balancer", "--port", str(port), *extra],
        {"LLMLB_HOME": str(home), "HF_ENDPOINT": CLOSED_ENDPOINT,
         "LLMLB_ENDPOINT_CHECK_SECONDS": "0.5", **env}, port)


def admin_key(home: Path) -> dict[str, str]:
    db = open_test_state(home)
    try:
        key, _ = create_api_key(db, "admin", "admin")
    finally:
        db.close()
    return {"Authorization": f"Bearer {key}"}


def wait_serving(url: str, key: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=10)
        if r.status_code == 200 and r.json()["data"]:
            return
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


def exactly_ten(urls: list[str], key: str) -> None:
    statuses = at_once(30, lambda i: chat(urls[i % len(urls)], key))
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses


def test_rpm_holds_across_two_workers_on_sqlite(start_process, llmlb_home: Path, fakes) -> None:
    fake = fakes(latency=0.05)
    admin = admin_key(llmlb_home)
    proc = serve(start_process, llmlb_home, "--workers", "2")
    add_endpoint(proc.url, fake, admin)
    key = new_key(proc.url, "ten", admin, rpm=10)
    wait_serving(proc.url, key)
    assert len(psutil.Process(proc.process.pid).children()) == 2
    exactly_ten([proc.url], key)
    assert len(fake.calls) == 10


def test_rpm_holds_across_two_balancers_on_postgresql(start_process, pg_url: str,
                                                      tmp_path: Path, fakes) -> None:
    fake = fakes(latency=0.05)
    shared = {"LLMLB_DATABASE_URL": pg_url, "LLMLB_ENDPOINTS_KEY": ENDPOINTS_KEY}
    os.environ.update(shared)
    try:
        admin = admin_key(tmp_path / "a")
    finally:
        for name in shared:
            os.environ.pop(name)
    one = serve(start_process, tmp_path / "a", **shared)
    two = serve(start_process, tmp_path / "b", **shared)
    add_endpoint(one.url, fake, admin)
    key = new_key(two.url, "ten", admin, rpm=10)
    wait_serving(one.url, key)
    wait_serving(two.url, key)
    exactly_ten([one.url, two.url], key)
    assert len(fake.calls) == 10


def test_a_killed_workers_lease_comes_back(start_process, llmlb_home: Path, fakes) -> None:
    fake = fakes(token_delay=1.0, tokens=60)  # a stream of a minute
    admin = admin_key(llmlb_home)
    proc = serve(start_process, llmlb_home, LLMLB_KEY_LEASE_SECONDS="4")
    add_endpoint(proc.url, fake, admin)
    key = new_key(proc.url, "one", admin, max_concurrent=1)
    wait_serving(proc.url, key)
    stream = client(proc.url, key).chat.completions.create(model="fake-model", messages=HELLO,
                                                           stream=True)
    next(iter(stream))
    assert chat(proc.url, key) == 429  # the stream holds the only slot
    for worker in psutil.Process(proc.process.pid).children():
        os.kill(worker.pid, signal.SIGKILL)  # the worker dies holding it; gunicorn starts another
    killed = time.monotonic()
    with contextlib.suppress(Exception):  # cut off: how the SDK says so varies
        for _ in stream:
            pass
    deadline = killed + 60
    while (status := chat(proc.url, key)) != 200:
        assert status in (429, 502, 503), status
        assert time.monotonic() < deadline, "the dead worker's lease never came back"
        time.sleep(0.3)
    assert time.monotonic() - killed >= 2.5  # not before the lease (renewed every 1.3 s) ran out

"""Usage (QT-3): what the tests sent, read back from ``GET /v0/usage`` (admin, filtered,
grouped, by hour or day) and ``/v0/usage/me`` (a key's own), on both state engines; served
from the roll-ups, so it stays when the history itself is pruned."""

from __future__ import annotations

import time

import requests
from playwright.sync_api import Page, expect

from llmlb import usage as usage_api
from llmlb.history import BATCH, History, RequestRecord
from llmlb.state import State

from .conftest import save_artifact
from .test_dashboard import browser, page  # noqa: F401 - Chromium, and a tab of it
from .test_db import state  # noqa: F401 - an open state, on each engine
from .test_limits import ADMIN, ENDPOINT_FAST, add_endpoint, chat, new_key


def usage(url: str, headers: dict[str, str] = ADMIN, path: str = "/v0/usage",
          **params) -> dict:
    r = requests.get(f"{url}{path}", headers=headers, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_requests(url: str, n: int) -> dict:
    deadline = time.monotonic() + 30
    while (got := usage(url))["total"]["requests"] < n:
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    return got


def test_usage_equals_what_was_sent(engine: str, make_server, fakes) -> None:
    fake = fakes("gpu", "fake-model", "other-model", latency=0.02, tokens=7)
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    alice, bob = new_key(server.url, "alice"), new_key(server.url, "bob")
    # alice: 3 answers and 2 streams; bob: 2 answers and one for a model nobody has.
    sent = [chat(server.url, alice) for _ in range(3)]
    sent += [chat(server.url, alice, "other-model", stream=True) for _ in range(2)]
    sent += [chat(server.url, bob) for _ in range(2)] + [chat(server.url, bob, "nope")]
    assert sent == [200] * 7 + [404]

    total = wait_for_requests(server.url, 8)["total"]
    assert (total["requests"], total["errors"]) == (8, 1)
    assert (total["tokens_in"], total["tokens_out"]) == (7 * 5, 7 * 7)  # 5 prompt, 7 answer
    assert 0 < total["latency_p50_ms"] <= total["latency_p95_ms"]
    assert total["ttft_p50_ms"] is not None

    per_key = {d["key"]: d for d in usage(server.url, group="key")["data"]}
    assert per_key["alice"]["requests"] == 5 and per_key["alice"]["tokens_out"] == 35
    assert per_key["bob"]["requests"] == 3 and per_key["bob"]["errors"] == 1
    assert per_key["bob"]["tokens_in"] == 10
    per_model = {d["model"]: d for d in usage(server.url, group="model", bucket="day")["data"]}
    assert {m: d["requests"] for m, d in per_model.items()} == {
        "fake-model": 5, "other-model": 2, "nope": 1}
    assert usage(server.url, key="bob", model="fake-model")["total"]["requests"] == 2
    assert usage(server.url, node="gpu")["total"]["requests"] == 7
    assert usage(server.url, **{"from": time.time() + 7200})["data"] == []

    # A key reads its own, and only its own.
    mine = usage(server.url, {"Authorization": f"Bearer {alice}"}, "/v0/usage/me",
                 key="bob")["total"]
    assert (mine["requests"], mine["tokens_in"], mine["errors"]) == (5, 25, 0)
    refused = requests.get(f"{server.url}/v0/usage", timeout=30,
                           headers={"Authorization": f"Bearer {alice}"})
    assert refused.status_code == 403

    # From the roll-ups: the history gone, the usage stays.
    server.runtime.db.requests.prune(time.time() + 1)
    assert requests.get(f"{server.url}/v0/requests", headers=ADMIN,
                        timeout=30).json()["data"] == []
    assert usage(server.url)["total"] == total


def test_percentiles_are_read_from_the_histograms_on_both_engines(
        state: State) -> None:  # noqa: F811
    """p50 and p95 (computed by the database from the summed histograms) land inside the
    bucket that holds the rank, placed linearly: 4 answers of 3 ms (bucket 0–5 ms) and 6 of
    30 ms (20–40 ms) give a p50 at rank 5 of 20 + 20 × 1/6 and a p95 at rank 9.5 of
    20 + 20 × 5.5/6; one answer past the last bound (82 s) is answered as its lower bound."""
    hour = 3600 * 500_000
    row = (hour + 60, "k", "chat", "m", "n", 200, 1)  # at .. stream
    rows = [(*row, 3.0, 2.0, 5, 7, None)] * 4 + [(*row, 30.0, None, 5, 7, None)] * 6
    slow = [(hour + 60, "slow", "chat", "m", "n", 500, 0, 100_000.0, None, 0, 0, "boom")]
    state.requests.insert(rows + slow, usage_api.rollup(rows + slow))

    def report(**filters: str) -> dict:
        return usage_api.report(state.usage, bucket="hour", group="key", filters=filters,
                                since=hour, until=hour + 3599)

    for answer in (report(), report(model="m")):  # the sums per key, and the roll-ups added
        points = {p["key"]: p for p in answer["data"]}
        assert points["k"] == {
            "start": hour, "key": "k", "requests": 10, "errors": 0, "tokens_in": 50,
            "tokens_out": 70, "latency_p50_ms": 23.3, "latency_p95_ms": 38.3,
            "ttft_p50_ms": 2.5, "ttft_p95_ms": 4.8}  # ttft: ranks 2, 3.8 of 4 in 0–5
        assert (points["slow"]["latency_p50_ms"], points["slow"]["ttft_p50_ms"]) == (
            81920.0, None)
        # in all, 11: p50 at rank 5.5 of 20 + 20 × 1.5/6; p95 at 10.45, past the 10 below 40
        assert answer["total"] == {
            "requests": 11, "errors": 1, "tokens_in": 50, "tokens_out": 70,
            "latency_p50_ms": 25.0, "latency_p95_ms": 81920.0, "ttft_p50_ms": 2.5,
            "ttft_p95_ms": 4.8}
    # A rank equal to a running count is in the bucket that reaches it: of 3 ms and 30 ms,
    # p50 (rank 1) is the top of 0–5 ms; p95 (rank 1.9) is 20 + 20 × 0.9.
    even = [(hour + 3660, "even", "chat", "m", "n", 200, 0, ms, None, 1, 1, None)
            for ms in (3.0, 30.0)]
    state.requests.insert(even, usage_api.rollup(even))
    point = usage_api.report(state.usage, bucket="hour", group=None, filters={"key": "even"},
                             since=hour, until=hour + 7199)["data"]
    assert [(p["start"], p["latency_p50_ms"], p["latency_p95_ms"]) for p in point] == [
        (hour + 3600, 5.0, 38.0)]
    empty = usage_api.report(state.usage, bucket="day", group=None, filters={},
                             since=0, until=86399)
    assert empty["data"] == [] and empty["total"]["latency_p50_ms"] is None
    assert empty["total"]["requests"] == 0


def test_a_busy_seconds_history_arrives_whole_in_several_transactions(
        state: State) -> None:  # noqa: F811
    """A worker's second of history is written in transactions of ``BATCH`` rows (one
    transaction of them all held a gevent worker's requests up for ~17 ms at 5,000 a second):
    every row arrives once, and the usage roll-ups sum them all."""
    hour = 3600 * 500_002
    history = History(state, retention_days=1)
    n = 2 * BATCH + 7
    for i in range(n):
        history.add(RequestRecord(hour + 60, "busy", "chat", "m", "n", 500 if i % 100 == 0
                                  else 200, False, 0.003, None, 2, 3, None))
    assert history.flush() == n
    assert history.flush() == 0
    total = usage_api.report(state.usage, bucket="hour", group=None, filters={"key": "busy"},
                             since=hour, until=hour + 3599)["total"]
    assert (total["requests"], total["errors"], total["tokens_in"], total["tokens_out"]) == (
        n, 11, 2 * n, 3 * n)
    assert len(history.query(key_name="busy", limit=n + 1)) == n


def test_usage_parameters_are_checked(make_server) -> None:
    server = make_server(role="balancer")
    for bad in ({"bucket": "week"}, {"group": "colour"}, {"from": "yesterday"},
                {"to": "nan"}):
        r = requests.get(f"{server.url}/v0/usage", headers=ADMIN, params=bad, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == next(iter(bad))


def test_the_usage_page_draws_what_was_sent(make_server, fakes, page: Page) -> None:  # noqa: F811
    fake = fakes("gpu", "fake-model", "other-model", latency=0.02)
    server = make_server(**ENDPOINT_FAST)
    add_endpoint(server.url, fake)
    alice, bob = new_key(server.url, "alice", rpm=1000), new_key(server.url, "bob")
    for key, model, stream in ((alice, "fake-model", False), (alice, "other-model", True),
                               (bob, "fake-model", False), (bob, "nope", False)):
        for _ in range(3):
            chat(server.url, key, model, stream)
    wait_for_requests(server.url, 12)

    page.goto(server.url + "/login?next=/requests")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "test")
    page.click("button[type=submit]")
    # The Requests page links a row to its key's usage.
    page.locator("#requests tbody tr td a", has_text="alice").first.click()
    expect(page).to_have_url(f"{server.url}/usage?key=alice")
    expect(page.locator("#chart-requests-key")).to_have_attribute("data-points", "1")
    expect(page.locator("#chart-requests-key .u-legend")).to_contain_text("alice")
    expect(page.locator("#chart-requests-key .u-legend")).not_to_contain_text("bob")

    page.fill("#range input[name=key]", "")
    page.click("#range button[type=submit]")
    expect(page.locator("#totals")).to_contain_text("12")
    for chart in ("requests-model", "tokens-model", "requests-key", "tokens-key", "latency",
                  "errors"):
        locator = page.locator(f"#chart-{chart}")
        expect(locator.locator("canvas")).to_have_count(1)
        assert int(locator.get_attribute("data-points")) >= 1, chart
    expect(page.locator("#chart-requests-model .u-legend")).to_contain_text("other-model")
    save_artifact("dashboard-usage.png", page.screenshot(full_page=True))

    # Live: more requests show up without a reload.
    for _ in range(3):
        chat(server.url, bob, "other-model")
    expect(page.locator("#totals")).to_contain_text("15", timeout=30_000)

    # The API keys page shows alice's limit and what she used of it.
    page.goto(server.url + "/keys")
    expect(page.locator("tr", has_text="alice").locator("[data-role=limits]")).to_contain_text(
        "/1000 req/min")

"""Endpoints on the dashboard's Nodes page (added, refused with the reason, removed) and the
Requests page with its filters, in Chromium (Playwright)."""

from __future__ import annotations

import requests
from playwright.sync_api import Page, expect

from llmlb.auth import create_api_key

from .conftest import HELLO, save_artifact
from .fake_openai import FakeOpenAI
from .test_dashboard import browser, dash, log_in, page  # noqa: F401 - fixtures


def test_endpoints_are_added_and_removed_on_the_nodes_page(dash, page: Page) -> None:  # noqa: F811
    server = dash(role="balancer", endpoint_check_seconds=0.3)
    with FakeOpenAI("gpu", ("fake-model", "other-model"), api_key="sk-up") as fake:
        log_in(page, server)
        page.click("nav >> text=Nodes")
        form = page.locator("#new-endpoint")
        form.locator("#endpoint-name").fill("big-box")
        form.locator("#endpoint-url").fill("file:///etc/passwd")
        form.locator("button").click()
        expect(page.locator("#toast")).to_contain_text("http:// or https://")

        form.locator("#endpoint-url").fill(fake.url)
        form.locator("button").click()
        expect(page.locator("#toast")).to_contain_text("API key")  # the endpoint said 401
        form.locator("#endpoint-key").fill("sk-up")
        form.locator("button").click()
        expect(page.locator("#toast")).to_contain_text("Added big-box: 2 models")
        row = page.locator('tr[data-node-name="big-box"]')
        expect(row.locator("[data-role=status]")).to_have_text("online")
        expect(row).to_contain_text("endpoint")
        expect(row).to_contain_text("API key")
        expect(row).to_contain_text("other-model")
        expect(row).not_to_contain_text("sk-up")
        save_artifact("dashboard-endpoints.png", page.screenshot())

        fake.fault = "down"
        expect(row.locator("[data-role=status]")).to_have_text("offline", timeout=10_000)
        fake.fault = None
        expect(row.locator("[data-role=status]")).to_have_text("online", timeout=10_000)
        page.once("dialog", lambda dialog: dialog.accept())
        row.locator("[data-role=remove]").click()
        expect(row).to_have_count(0)
        assert requests.get(f"{server.url}/v0/endpoints", timeout=10, headers={
            "Authorization": f"Bearer {create_api_key(server.runtime.db, 'a', 'admin')[0]}"
        }).json()["data"] == []


def test_requests_page_lists_and_filters_the_history(dash, page: Page) -> None:  # noqa: F811
    server = dash(role="balancer")
    admin, _ = create_api_key(server.runtime.db, "admin", "admin")
    client_key, _ = create_api_key(server.runtime.db, "ci-runner", "api")
    with FakeOpenAI("gpu") as fake:
        r = requests.post(f"{server.url}/v0/endpoints", timeout=10,
                          headers={"Authorization": f"Bearer {admin}"},
                          json={"name": "gpu", "base_url": fake.url})
        assert r.status_code == 201, r.text
        for model in ("fake-model", "fake-model", "missing-model"):
            requests.post(f"{server.url}/v1/chat/completions", timeout=10,
                          headers={"Authorization": f"Bearer {client_key}"},
                          json={"model": model, "messages": HELLO})
        server.runtime.history.flush()

        log_in(page, server)
        page.click("nav >> text=Requests")
        rows = page.locator("#requests tbody tr")
        expect(rows).to_have_count(3)
        expect(rows.first).to_contain_text("missing-model")
        expect(rows.first.locator("[data-role=status]")).to_have_text("404")
        expect(rows.nth(1)).to_contain_text("ci-runner")
        expect(rows.nth(1)).to_contain_text("gpu")
        expect(rows.nth(1)).to_contain_text("5 → 5")
        page.select_option("#filters select[name=status]", "error")
        page.click("#filters button")
        expect(rows).to_have_count(1)
        page.select_option("#filters select[name=status]", "")
        page.fill("#filters input[name=node]", "gpu")
        page.click("#filters button")
        expect(rows).to_have_count(2)
        save_artifact("dashboard-requests.png", page.screenshot())

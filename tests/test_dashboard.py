"""The dashboard in a real browser (Debian's Chromium driven by Playwright): log in, pull
with a live progress bar, retry a failure, chat in the Playground, delete from Local."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from .conftest import LiveServer, save_artifact
from .fake_hub import FakeHub
from .test_plugins import SLOW_ENGINE, write_plugin

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network: no background calls to Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def dash(hub_server):
    """A production-mode server (no sk_debug, no admin/test) with a known admin password."""
    def start(**overrides) -> LiveServer:
        return hub_server(**{"dev": False, "admin_password": "correct horse", **overrides})
    return start


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A browser tab; the test fails if anything on the page breaks the Content-Security-
    Policy (an inline script or style, a foreign host)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    yield page
    context.close()
    assert not violations, violations


def log_in(page: Page, server: LiveServer, password: str = "correct horse") -> None:
    page.goto(server.url + "/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def card(page: Page, model_id: str):
    return page.locator(f'[data-model-id="{model_id}"]')


def test_login_logout_and_local_assets(dash, page: Page) -> None:
    server = dash()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url + "/models")
    expect(page).to_have_url(f"{server.url}/login?next=/models")
    save_artifact("dashboard-login.png", page.screenshot())
    log_in(page, server, password="wrong")
    expect(page.locator(".alert.error")).to_have_text("Wrong user name or password.")
    log_in(page, server)
    expect(page).to_have_url(f"{server.url}/models")
    expect(page.locator(".model-card")).to_have_count(4)
    page.click("text=Log out")
    expect(page).to_have_url(f"{server.url}/login")
    page.goto(server.url + "/models")
    expect(page).to_have_url(f"{server.url}/login?next=/models")
    assert requested and all(url.startswith(server.url) for url in requested), \
        "every asset must come from llmlb itself"


def test_pull_shows_live_progress_then_ready(dash, page: Page, hub: FakeHub) -> None:
    server = dash()
    hub.throttle_bps = 120_000  # ~5 s
    log_in(page, server)
    # The live updates' WebSocket is open (the session's, from the dashboard's own origin).
    expect(page.locator("#live")).to_have_class(re.compile(r"\bon\b"), timeout=15_000)
    tiny = card(page, "tiny-gguf")
    expect(tiny.locator("[data-role=status]")).to_have_text("Available")
    expect(tiny).to_contain_text("571.5 KB")
    tiny.locator("button", has_text="Pull").click()
    bar = tiny.locator("[role=progressbar]")
    expect(bar).to_be_visible(timeout=10_000)
    values = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and tiny.get_attribute("data-status") != "Ready":
        if bar.count():
            try:  # the card is redrawn at each event: the bar may be gone by now
                value = bar.get_attribute("aria-valuenow", timeout=500)
            except PlaywrightTimeoutError:
                continue
            if value is not None:
                values.append(int(value))
                if len(values) == 8:
                    save_artifact("dashboard-models-downloading.png", page.screenshot())
        time.sleep(0.2)
    distinct = sorted(set(values))
    assert len(distinct) >= 3, f"the progress bar did not move: {values}"
    assert values == sorted(values)
    expect(tiny.locator("[data-role=status]")).to_have_text("Ready", timeout=30_000)
    expect(tiny).to_contain_text("Ready to serve")
    save_artifact("dashboard-models-ready.png", page.screenshot())


def test_failed_pull_offers_retry(dash, page: Page, hub: FakeHub) -> None:
    server = dash()
    hub.inject("model.gguf", status=500, method="GET", times=None)
    log_in(page, server)
    tiny = card(page, "tiny-gguf")
    tiny.locator("button", has_text="Pull").click()
    expect(tiny.locator("[data-role=status]")).to_have_text("Error", timeout=20_000)
    expect(tiny.locator(".error-text")).to_contain_text("HTTP 500")
    save_artifact("dashboard-models-error.png", page.screenshot())
    hub.clear_faults()
    tiny.locator("button", has_text="Retry").click()
    expect(tiny.locator("[data-role=status]")).to_have_text("Ready", timeout=30_000)


def test_playground_streams_a_chat(dash, page: Page, tiny, llmlb_home: Path) -> None:
    plugins = llmlb_home / "plugins"
    write_plugin(plugins, "slow", SLOW_ENGINE)  # 0.05 s a token: streaming is visible
    server = dash(plugins_dir=[str(plugins)])
    shutil.copytree(tiny["llama-gguf"].parent, server.models_dir / "tiny-gguf")
    (server.models_dir / "snail").mkdir()
    (server.models_dir / "snail" / "model.slow").write_text("0.05")
    log_in(page, server)
    page.click("nav >> text=Playground")
    expect(page.locator("#model")).to_have_value("snail")

    page.select_option("#model", "snail")
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "Count for me")
    page.click("#send")
    streaming = page.locator(".msg.assistant")
    expect(streaming).to_contain_text("5 ", timeout=20_000)
    partial = streaming.inner_text()
    assert streaming.get_attribute("data-done") is None  # seen while still arriving
    expect(page.locator(".msg.assistant[data-done=true]")).to_have_count(1, timeout=20_000)
    final = streaming.inner_text()
    assert final.startswith(partial.strip()) and len(final) > len(partial)
    assert final.strip().endswith("39")

    page.click("#clear")
    page.select_option("#model", "tiny-gguf")
    page.fill("#max-tokens", "64")
    page.fill("#prompt", "Hello! How are you?")
    page.keyboard.press("Enter")
    answer = page.locator(".msg.assistant[data-done=true]")
    expect(answer).to_have_count(1, timeout=60_000)
    assert answer.inner_text().strip()
    expect(page.locator("#usage")).to_contain_text("64 completion tokens")
    expect(page.locator(".msg.user")).to_have_text("Hello! How are you?")
    save_artifact("dashboard-playground.png", page.screenshot())


def test_local_tab_deletes(dash, page: Page, tiny) -> None:
    server = dash()
    shutil.copytree(tiny["llama-gguf"].parent, server.models_dir / "tiny-gguf")
    shutil.copytree(tiny["llama-st"], server.models_dir / "hand-placed")
    log_in(page, server)
    expect(card(page, "tiny-gguf").locator("[data-role=status]")).to_have_text("Ready")
    page.click("text=Local")
    rows = page.locator("#local tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator('#local tr[data-model-id="hand-placed"]')).to_contain_text(
        "added by hand")
    save_artifact("dashboard-local.png", page.screenshot())
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator('#local tr[data-model-id="tiny-gguf"] button', has_text="Delete").click()
    expect(rows).to_have_count(1)
    assert not (server.models_dir / "tiny-gguf").exists()
    page.click("text=Model Hub")
    expect(card(page, "tiny-gguf").locator("[data-role=status]")).to_have_text("Available")


def test_state_changes_need_the_csrf_token(dash, page: Page) -> None:
    server = dash()
    log_in(page, server)
    expect(page.locator(".model-card")).to_have_count(4)
    forged = page.request.post(f"{server.url}/api/models/register",
                               data={"model_id": "tiny-gguf"})
    assert forged.status == 403 and forged.json()["error"]["code"] == "csrf_failed"
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    honest = page.request.post(f"{server.url}/api/models/register",
                               data={"model_id": "tiny-gguf"}, headers={"X-CSRF-Token": token})
    assert honest.status == 202


def test_api_keys_page(dash, page: Page) -> None:
    server = dash()
    log_in(page, server)
    page.click("nav >> text=API keys")
    page.fill("#key-name", "laptop")
    page.click("text=Create key")
    key = page.locator("#new-key-value").inner_text()
    assert key.startswith("sk-")
    expect(page.locator("#keys tbody tr")).to_have_count(1)
    assert server.client(api_key=key).models.list().data == []
    save_artifact("dashboard-keys.png", page.screenshot())


def test_a_page_whose_session_ended_goes_to_the_login(dash, page: Page) -> None:
    """Logged out elsewhere (another tab, a new password): the page's next call is told
    its session ended and the browser lands on the login form, not on 'Missing API key'."""
    from llmlb import auth

    server = dash()
    log_in(page, server)
    page.click("nav >> text=API keys")
    expect(page.locator("#keys")).to_contain_text("No API keys yet.")
    auth.set_password(server.runtime.db, "admin", "a new passphrase")
    page.fill("#key-name", "after the end")
    page.click("text=Create key")
    expect(page).to_have_url(f"{server.url}/login?next=/keys")
    assert auth.list_api_keys(server.runtime.db) == []
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "a new passphrase")
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/keys")  # back where the user was

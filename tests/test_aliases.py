"""Model aliases (AG-5): a name agents use stands for a list of models, set through the admin
API and the CLI; a request for it goes to the first model that can serve, and to the next
when one fails before the first byte — in all three APIs. Upstreams are
``tests/fake_openai.py`` endpoints on loopback."""

from __future__ import annotations

import os
import subprocess

import anthropic
import requests

from .conftest import HELLO, llmlb_command
from .test_dashboard import browser, dash, log_in, page  # noqa: F401 - fixtures
from .test_endpoints import ADMIN, FAST, add


def put(server, name: str, models: object) -> requests.Response:  # noqa: ANN001
    return requests.put(f"{server.url}/v0/aliases/{name}", headers=ADMIN, timeout=10,
                        json={"models": models})


def test_an_alias_answers_with_the_first_model_that_can(make_server, fakes) -> None:  # noqa: F811
    broken = fakes("broken", "big-model")
    spare = fakes("spare", "small-model")
    server = make_server(**FAST)
    assert add(server, "broken", broken.url).status_code == 201
    assert add(server, "spare", spare.url).status_code == 201

    r = put(server, "claude-sonnet-4-5", ["big-model", "small-model"])
    assert r.status_code == 200 and r.json()["models"] == ["big-model", "small-model"]
    listed = requests.get(f"{server.url}/v0/aliases", headers=ADMIN, timeout=10).json()
    assert listed["data"] == [{"name": "claude-sonnet-4-5",
                               "models": ["big-model", "small-model"]}]

    client = server.client()
    raw = client.chat.completions.with_raw_response.create(model="claude-sonnet-4-5",
                                                           messages=HELLO)
    assert raw.headers["X-LLMLB-Node"] == "broken" and broken.calls[-1]["model"] == "big-model"

    broken.fault = "500"  # fails before the first byte: the next model answers
    claude = anthropic.Anthropic(base_url=server.url, api_key="sk_debug", max_retries=0)
    message = claude.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=5,
                                                       messages=HELLO)
    assert message.headers["X-LLMLB-Node"] == "spare"
    assert message.parse().content[0].text == "hello from spare"
    assert spare.calls[-1]["model"] == "small-model"
    answer = client.responses.create(model="claude-sonnet-4-5", input="Hi")
    assert answer.output_text == "hello from spare"

    # a model nobody serves is skipped too; an alias of only such models is the last error
    assert put(server, "gpt-4o", ["no-such-model", "small-model"]).status_code == 200
    assert client.chat.completions.create(model="gpt-4o", messages=HELLO).model == "small-model"
    assert put(server, "nothing", ["no-such-model"]).status_code == 200
    r = requests.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=10,
                      json={"model": "nothing", "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    # bad definitions are 400s naming the field; removing twice is a 404
    assert put(server, "loop", ["loop"]).json()["error"]["param"] == "models"
    assert put(server, "empty", []).status_code == 400
    r = requests.delete(f"{server.url}/v0/aliases/gpt-4o", headers=ADMIN, timeout=10)
    assert r.status_code == 200
    r = requests.delete(f"{server.url}/v0/aliases/gpt-4o", headers=ADMIN, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "alias_not_found"
    api_only = requests.get(f"{server.url}/v0/aliases", timeout=10,
                            headers={"Authorization": "Bearer sk-none"})
    assert api_only.status_code == 401


def test_aliases_from_the_shell(llmlb_home, tmp_path) -> None:
    env = {**os.environ, "LLMLB_HOME": str(llmlb_home)}

    def llmlb(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*llmlb_command(), "aliases", *args], env=env, timeout=60,
                              capture_output=True, text=True)

    done = llmlb("set", "Claude-Sonnet-4-5", "qwen2.5-7b", "llama3.2:1b")
    assert done.returncode == 0, done.stderr
    assert llmlb("list").stdout == "claude-sonnet-4-5\tqwen2.5-7b,llama3.2:1b\n"
    assert llmlb("set", "x").returncode != 0  # no models
    assert llmlb("remove", "claude-sonnet-4-5").returncode == 0
    assert llmlb("list").stdout == ""
    assert "no alias" in llmlb("remove", "claude-sonnet-4-5").stderr


def test_aliases_on_the_dashboard(dash, page) -> None:  # noqa: F811, ANN001
    from playwright.sync_api import expect

    server = dash(role="balancer")
    log_in(page, server)
    page.click("nav >> text=Nodes")
    expect(page.locator("#aliases")).to_contain_text("No aliases.")
    form = page.locator("#new-alias")
    form.locator("#alias-name").fill("gpt-4o")
    form.locator("#alias-models").fill("qwen2.5-7b, llama3.2:1b")
    form.locator("button").click()
    expect(page.locator("#toast")).to_contain_text("gpt-4o → qwen2.5-7b, llama3.2:1b")
    row = page.locator('tr[data-alias="gpt-4o"]')
    expect(row).to_contain_text("qwen2.5-7b → llama3.2:1b")
    assert server.runtime.balancer.aliases.all() == {"gpt-4o": ["qwen2.5-7b", "llama3.2:1b"]}
    form.locator("#alias-name").fill("loop")
    form.locator("#alias-models").fill("loop")
    form.locator("button").click()
    expect(page.locator("#toast")).to_contain_text("cannot name itself")
    row.locator("button").click()
    expect(row).to_have_count(0)
    assert server.runtime.balancer.aliases.all() == {}

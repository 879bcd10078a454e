"""The dashboard's Nodes page and the Model Hub's node names, in Chromium (Playwright)."""

from __future__ import annotations

import re
import shutil

import requests
from playwright.sync_api import Page, expect

from llmlb.auth import create_api_key

from .conftest import save_artifact
from .test_dashboard import browser, card, dash, log_in, page  # noqa: F401 - fixtures

H100 = 80 * 1024**3


def gpu_report(models: list[dict]) -> dict:
    """What a node on a two-GPU machine reports (llmlb.node.agent.Reporter's shape)."""
    gpus = [{"index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i}",
             "memory_total_bytes": H100, "memory_free_bytes": H100 // 4} for i in range(2)]
    return {
        "version": "0.1.0",
        "hardware": {"device": gpus[0]["name"], "gpu_count": 2, "gpus": gpus,
                     "vram_total_bytes": 2 * H100, "vram_free_bytes": H100 // 2,
                     "cpu_count": 64, "memory_total_bytes": 512 * 1024**3,
                     "memory_free_bytes": 400 * 1024**3},
        "engines": [], "formats": ["gguf", "safetensors"], "models": models,
        "loaded": [{"id": "tiny-gguf", "format": "gguf", "busy": True, "waiting": 2}],
        "downloads": [{"model_id": "tiny-st", "status": "downloading", "progress": 0.42,
                       "downloaded_bytes": 42, "total_bytes": 100}],
        "active_requests": 3, "queued_requests": 2, "can_download": True,
    }


def test_nodes_page_shows_every_node_live(dash, page: Page, tiny) -> None:  # noqa: F811
    server = dash(node_timeout_seconds=4.0)
    shutil.copytree(tiny["llama-gguf"].parent, server.models_dir / "tiny-gguf")
    node_key, _ = create_api_key(server.runtime.db, "nodes", "node")
    # The page first, the node after: it must appear live, and its one heartbeat must not
    # expire while a slow machine is still logging in.
    log_in(page, server)
    page.click("nav >> text=Nodes")
    expect(page).to_have_url(f"{server.url}/nodes")
    entry = {"id": "tiny-gguf", "object": "model", "created": 0, "owned_by": "local",
             "format": "gguf", "size_bytes": 1, "status": "ready"}
    r = requests.post(f"{server.url}/v0/nodes", timeout=10,
                      headers={"Authorization": f"Bearer {node_key}"},
                      json={"name": "gpu-box", "url": "http://127.0.0.1:9",
                            "secret": "s" * 32, "report": gpu_report([entry])})
    assert r.status_code == 201, r.text

    local = page.locator('tr[data-node-name="local"]')
    box = page.locator('tr[data-node-name="gpu-box"]')
    expect(local.locator("[data-role=status]")).to_have_text("online")
    expect(local).to_contain_text("CPUs")
    expect(local).to_contain_text("tiny-gguf")
    expect(local).to_contain_text("RAM")
    expect(box.locator("[data-role=status]")).to_have_text("online")
    expect(box).to_contain_text("2 × NVIDIA H100 80GB HBM3")
    expect(box).to_contain_text("VRAM")
    expect(box.locator("meter")).to_have_attribute("value", str(2 * H100 - H100 // 2))
    expect(box.locator('[data-model-id="tiny-st"] progress')).to_have_attribute("value", "42")
    expect(box).to_contain_text("loaded: tiny-gguf")
    expect(box.locator("[data-role=active]")).to_contain_text("3 active · 2 queued")
    # Recent: "just now", or a few seconds on a slow machine (its one heartbeat is not renewed).
    expect(box.locator("[data-role=heartbeat]")).to_contain_text(
        re.compile(r"just now|^[0-3] s ago"))
    expect(page.locator("#summary")).to_have_text("2 of 2 online")
    save_artifact("dashboard-nodes.png", page.screenshot())

    # No heartbeat: the page turns it offline by itself, then it can be forgotten.
    expect(box.locator("[data-role=status]")).to_have_text("offline", timeout=15_000)
    expect(box.locator("[data-role=heartbeat]")).to_contain_text(re.compile(r"\d+ s ago"))
    page.once("dialog", lambda dialog: dialog.accept())
    box.locator("button", has_text="Forget").click()
    expect(box).to_have_count(0)
    expect(page.locator("#summary")).to_have_text("1 of 1 online")

    # Content-Security-Policy without 'unsafe-inline': no inline script, style or handler,
    # neither in the page served nor in what its script builds.
    html = page.request.get(f"{server.url}/nodes").text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert page.locator("#nodes [style], #nodes [onclick]").count() == 0


def test_model_hub_names_the_nodes_that_have_a_model(dash, page: Page, tiny) -> None:  # noqa: F811
    server = dash()
    shutil.copytree(tiny["llama-gguf"].parent, server.models_dir / "tiny-gguf")
    node_key, _ = create_api_key(server.runtime.db, "nodes", "node")
    entry = {"id": "tiny-gguf", "object": "model", "created": 0, "owned_by": "local",
             "format": "gguf", "size_bytes": 1, "status": "ready"}
    requests.post(f"{server.url}/v0/nodes", headers={"Authorization": f"Bearer {node_key}"},
                  json={"name": "gpu-box", "url": "http://127.0.0.1:9", "secret": "s" * 32,
                        "report": gpu_report([entry])}, timeout=10).raise_for_status()
    log_in(page, server)
    tiny_card = card(page, "tiny-gguf")
    expect(tiny_card.locator("[data-role=status]")).to_have_text("Ready")
    expect(tiny_card.locator("[data-role=nodes]")).to_have_text("on local, gpu-box")
    # A node's download shows on the hub card as the cluster's progress.
    expect(card(page, "tiny-st").locator("[data-role=status]")).to_have_text("Downloading")
    expect(card(page, "tiny-st").locator("[role=progressbar]")).to_have_attribute(
        "aria-valuenow", "42")

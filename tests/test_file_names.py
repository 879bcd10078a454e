"""File names that come from outside never become paths outside the model directories
(SC-5, ST-3): a balancer's manifest, a blob URL, and symlinks found in a model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest
import requests

from llmlb.catalog import CatalogError, parse_catalog

from .conftest import HELLO, LiveServer, raw_get
from .fake_balancer import PAYLOAD, FakeBalancer

DEV = {"Authorization": "Bearer sk_debug"}


def everything_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["../../../../escaped.sh", "ABSOLUTE", "onnx/../../x.sh",
                                  ".locks/tiny.lock", "a\\..\\..\\b.sh", "nul\x00.gguf"])
def test_a_balancers_manifest_cannot_write_outside(make_server, fake_balancer: FakeBalancer,
                                                   tmp_path: Path, name: str) -> None:
    absolute = tmp_path / "plugins-elsewhere" / "evil.py"
    name = str(absolute) if name == "ABSOLUTE" else name
    node = make_server(balancer_url=fake_balancer.url, node_api_key="sk_debug",
                       download_allowlist=["none"])
    fake_balancer.manifest("model.gguf", name)
    before = everything_under(tmp_path)
    with pytest.raises(openai.APIStatusError) as info:
        node.client().chat.completions.create(model="evil", messages=HELLO)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "download_failed"
    assert "unsafe file" in info.value.body["message"]
    created = everything_under(tmp_path) - before
    assert not [p for p in created if p.is_file() and p.read_bytes() == PAYLOAD]
    assert not absolute.exists() and not (tmp_path / "escaped.sh").exists()
    assert fake_balancer.blob_requests == []  # refused before a byte was fetched


def test_a_good_manifest_still_syncs(make_server, fake_balancer: FakeBalancer) -> None:
    """The same fake balancer with plain names: the files land in the model's directory."""
    node = make_server(balancer_url=fake_balancer.url, node_api_key="sk_debug",
                       download_allowlist=["none"])
    fake_balancer.manifest("model.gguf", "tokenizer/config.json")
    with pytest.raises(openai.APIStatusError):  # the payload is no GGUF: loading fails
        node.client().chat.completions.create(model="evil", messages=HELLO)
    model_dir = node.models_dir / "evil"
    assert (model_dir / "model.gguf").read_bytes() == PAYLOAD
    assert (model_dir / "tokenizer" / "config.json").read_bytes() == PAYLOAD


@pytest.mark.parametrize("filename", ["../x.gguf", "/etc/passwd", "a/./b.gguf", ".hidden.gguf",
                                      "nul\x00.gguf", "x" * 300 + ".gguf"])
def test_the_catalog_refuses_unsafe_file_names(filename: str) -> None:
    catalog = json.loads((Path(__file__).parent.parent / "supported_models.json").read_text())
    catalog["models"][0]["artifacts"][0]["filename"] = filename
    with pytest.raises(CatalogError, match="filename"):
        parse_catalog(catalog)


@pytest.fixture
def model_on_disk(server: LiveServer, tmp_path: Path) -> Path:
    model = server.models_dir / "org" / "tiny"
    model.mkdir(parents=True)
    (model / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    return model


def test_a_nul_byte_in_a_blob_name_is_400(server: LiveServer, model_on_disk: Path) -> None:
    for path in ("/v1/models/blob/org/tiny/model%00.gguf", "/v1/models/blob/org/tiny/%00",
                 "/v1/models/blob/org/ti%00ny/model.gguf"):
        status, body = raw_get(server, path)
        assert status in (400, 404) and body["error"]["code"], path


def test_symlinks_in_a_model_dir(server: LiveServer, model_on_disk: Path,
                                 tmp_path: Path) -> None:
    """A dangling link does not break the manifest; a link to a file elsewhere on the disk
    is neither described nor served; a link inside the model is an ordinary file."""
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"s" * 12345)
    os.symlink(tmp_path / "nowhere", model_on_disk / "gone.json")
    os.symlink(secret, model_on_disk / "notes.txt")
    os.symlink("model.gguf", model_on_disk / "alias.gguf")
    r = requests.get(f"{server.url}/v0/models/registry/org/tiny/manifest.json", headers=DEV,
                     timeout=10)
    assert r.status_code == 200, r.text
    files = {f["filename"]: f["size_bytes"] for f in r.json()["files"]}
    assert files == {"alias.gguf": 64, "model.gguf": 64}
    assert 12345 not in files.values()
    for name in ("notes.txt", "gone.json"):
        status, body = raw_get(server, f"/v1/models/blob/org/tiny/{name}")
        assert status in (400, 404) and "error" in body, name

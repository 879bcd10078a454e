"""/v1/models, /v1/models/{id} and manifests (ST-4, ST-6, ST-7) through the openai SDK."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import requests

from .conftest import LiveServer

DEV = {"Authorization": "Bearer sk_debug"}


def place_gguf(models_dir: Path, model_id: str, size: int = 1234) -> Path:
    target = models_dir / model_id / "model.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"GGUF" + b"\0" * (size - 4))
    return target


def place_safetensors_repo(models_dir: Path, model_id: str) -> Path:
    target = models_dir / model_id
    target.mkdir(parents=True)
    for name, data in {"config.json": b"{}", "tokenizer.json": b"{}",
                       "model-00001-of-00002.safetensors": b"x" * 10,
                       "model-00002-of-00002.safetensors": b"x" * 20,
                       "model.safetensors.index.json": b"{}"}.items():
        (target / name).write_bytes(data)
    return target


def test_models_placed_by_hand_appear_without_restart(server: LiveServer) -> None:
    client = server.client()
    assert client.models.list().data == []
    place_gguf(server.models_dir, "llama-3.2-1b")
    place_safetensors_repo(server.models_dir, "qwen2.5-coder-7b")

    ids = [m.id for m in client.models.list().data]
    assert ids == ["llama-3.2-1b", "qwen2.5-coder-7b"]

    raw = requests.get(f"{server.url}/v1/models", headers=DEV, timeout=10).json()
    assert raw["object"] == "list"
    by_id = {m["id"]: m for m in raw["data"]}
    assert by_id["llama-3.2-1b"]["object"] == "model"
    assert by_id["llama-3.2-1b"]["owned_by"] == "local"
    assert by_id["llama-3.2-1b"]["format"] == "gguf"
    assert by_id["qwen2.5-coder-7b"]["format"] == "safetensors"
    assert by_id["qwen2.5-coder-7b"]["size_bytes"] == 30
    assert isinstance(by_id["llama-3.2-1b"]["created"], int)

    shutil.rmtree(server.models_dir / "llama-3.2-1b")
    assert [m.id for m in client.models.list().data] == ["qwen2.5-coder-7b"]


def test_retrieve_local_catalog_and_unknown(server: LiveServer) -> None:
    client = server.client()
    place_gguf(server.models_dir, "my-model")
    assert client.models.retrieve("my-model").id == "my-model"
    assert client.models.retrieve("My-Model").id == "my-model"  # ids are case-insensitive

    catalog_only = requests.get(f"{server.url}/v1/models/llama-3.2-1b", headers=DEV,
                                timeout=10).json()
    assert catalog_only["status"] == "not_downloaded" and catalog_only["owned_by"] == "catalog"

    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("unknown-model")
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["message"] == "Model 'unknown-model' not found"


def test_shared_models_are_listed(make_server, tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    place_gguf(shared, "shared-model")
    server = make_server(shared_models_dir=shared)
    place_gguf(server.models_dir, "local-model")
    listed = requests.get(f"{server.url}/v1/models", headers=DEV, timeout=10).json()["data"]
    assert {m["id"]: m["owned_by"] for m in listed} == {"local-model": "local",
                                                       "shared-model": "shared"}


def test_manifest_of_a_local_model(server: LiveServer) -> None:
    place_safetensors_repo(server.models_dir, "qwen2.5-coder-7b")
    response = requests.get(f"{server.url}/v0/models/registry/qwen2.5-coder-7b/manifest.json",
                            headers=DEV, timeout=10)
    assert response.status_code == 200
    manifest = response.json()
    assert manifest["model_id"] == "qwen2.5-coder-7b"
    files = {f["filename"]: f for f in manifest["files"]}
    assert files["model-00001-of-00002.safetensors"] == {
        "filename": "model-00001-of-00002.safetensors", "format": "safetensors",
        "size_bytes": 10, "url": f"{server.url}/v1/models/blob/qwen2.5-coder-7b/"
                                 "model-00001-of-00002.safetensors"}
    assert files["config.json"]["format"] == "support"  # companions a node must sync too
    assert manifest["created_at"].endswith("Z")


def test_manifest_of_a_catalog_model(server: LiveServer) -> None:
    manifest = requests.get(f"{server.url}/v0/models/registry/llama-3.2-1b/manifest.json",
                            headers=DEV, timeout=10).json()
    assert manifest["repo"] == "bartowski/Llama-3.2-1B-Instruct-GGUF"
    [file] = manifest["files"]
    assert file["filename"] == "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    assert file["format"] == "gguf" and file["size_bytes"] > 500_000_000
    assert "/resolve/main/Llama-3.2-1B-Instruct-Q4_K_M.gguf" in file["url"]


def test_manifest_errors(server: LiveServer) -> None:
    missing = requests.get(f"{server.url}/v0/models/registry/nope/manifest.json", headers=DEV,
                           timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_catalog_is_real_and_valid() -> None:
    catalog = json.loads((Path(__file__).parent.parent / "supported_models.json").read_text())
    sources = {m["source"] for m in catalog["models"]}
    assert sources == {"hf_gguf", "hf_safetensors", "hf_onnx"}
    from llmlb.catalog import parse_catalog

    assert "llama-3.2-1b" in parse_catalog(catalog)

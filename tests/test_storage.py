"""Model ids (ST-3), format detection (ST-5) and listing (ST-4) as a user meets them."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from llmlb.storage import InvalidModelId, detect_format, list_models, normalize_model_id

from .conftest import LiveServer, raw_get

BAD_IDS = {
    "../x": "path traversal",
    "a/../b": "path traversal",
    "%2e%2e/x": "path traversal",
    "/etc/passwd": "absolute path",
    "a\\b": "backslash",
    "a//b": "empty path segment",
    "a/": "ends with '/'",
    "modèle": "non-ASCII",
    "mo\x00del": "control character",
    "tab\there": "control character",
    "x" * 257: "longer than 256",
    "": "is empty",
    ".locks": "starts or ends with '.'",
    "a b": "character ' '",
}


@pytest.mark.parametrize("bad,reason", BAD_IDS.items(), ids=[repr(k)[:20] for k in BAD_IDS])
def test_bad_id_is_400_naming_the_reason(server: LiveServer, bad: str, reason: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model=bad, messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert error["code"] == "invalid_model_id"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Invalid model ID: ")
    assert reason in error["message"]


def test_traversal_in_urls_never_reaches_outside(server: LiveServer, tmp_path: Path) -> None:
    # A model directory right outside models_dir that a traversal would find.
    outside = server.models_dir.parent / "secret"
    outside.mkdir()
    (outside / "model.gguf").write_bytes(b"GGUF")
    for path in ("/v1/models/../secret", "/v1/models/..%2fsecret", "/v1/models/%2e%2e/secret",
                 "/v0/models/registry/..%2Fsecret/manifest.json",
                 "/v0/models/..%2Fsecret/status", "/v1/models/blob/..%2fsecret/model.gguf"):
        status, body = raw_get(server, path)  # a file's bytes would not parse as JSON
        assert status in (400, 404), path
        assert body["error"]["code"] in ("invalid_model_id", "model_not_found", "not_found")
        assert str(outside) not in json.dumps(body)  # nothing about the outside either
    listed = server.client().models.list().data
    assert "secret" not in [m.id for m in listed]
    status, body = raw_get(server, "/v1/models/..%2fsecret")
    assert status == 400 and body["error"]["code"] == "invalid_model_id"


def test_ids_are_lower_cased() -> None:
    assert normalize_model_id("Qwen2.5-Coder-7B") == "qwen2.5-coder-7b"
    assert normalize_model_id("Org/Model_1") == "org/model_1"
    with pytest.raises(InvalidModelId):
        normalize_model_id(None)


def test_detection_by_artifact(tmp_path: Path) -> None:
    cases = {
        "g": ["model.gguf"], "s": ["model-00001-of-00002.safetensors", "config.json"],
        "o": ["config.json", "onnx/model.onnx"], "m": ["model.metal.bin"],
        "none": ["README.md", "model.gguf.partial"],
    }
    for name, files in cases.items():
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_bytes(b"x")
    assert detect_format(tmp_path / "g")[0] == "gguf"
    assert detect_format(tmp_path / "s")[0] == "safetensors"
    assert detect_format(tmp_path / "o")[0] == "onnx"
    assert detect_format(tmp_path / "m")[0] == "metal"
    assert detect_format(tmp_path / "none") is None


def test_listing_nested_mixed_case_and_private_dirs(tmp_path: Path) -> None:
    for rel in ("Llama-3.2-1B/model.gguf", "org/qwen/model.safetensors",
                ".downloads/half/model.gguf", "empty/README.md", "bad name/model.gguf"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    ids = [m.id for m in list_models(tmp_path, "local")]
    assert ids == ["llama-3.2-1b", "org/qwen"]


def test_listing_hundreds_of_models(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"m{i:03d}").mkdir()
        (tmp_path / f"m{i:03d}" / "model.gguf").write_bytes(b"x" * i)
    models = list_models(tmp_path, "local")
    assert len(models) == 300
    assert models[7].size_bytes == 7

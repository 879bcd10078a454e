"""The catalog of supported models (``supported_models.json``, RS-1): load and validate.

A bad catalog stops the start with a message naming the entry and the problem. The file is
re-read when its modification time changes, so an edited catalog needs no restart.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .storage import InvalidFileName, InvalidModelId, normalize_model_id, safe_file_name

log = logging.getLogger(__name__)

SOURCES = {"hf_gguf": "gguf", "hf_safetensors": "safetensors", "hf_onnx": "onnx"}


class CatalogError(ValueError):
    """The catalog file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Artifact:
    filename: str
    size_bytes: int
    sha256: str | None = None


@dataclass(frozen=True)
class CatalogModel:
    id: str
    name: str
    description: str
    source: str
    repo_id: str
    revision: str
    artifacts: tuple[Artifact, ...]
    required_vram_mb: int
    tags: tuple[str, ...]
    capabilities: tuple[str, ...]
    quantization: str | None
    #: the KV cache one token of context takes (16-bit keys and values, every layer); 0 for
    #: models without one (encoders) or when the catalog does not say
    kv_cache_bytes_per_token: int = 0

    @property
    def format(self) -> str:
        return SOURCES[self.source]

    @property
    def size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.artifacts)

    @property
    def required_memory_bytes(self) -> int:
        return self.required_vram_mb * 1024 * 1024

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "description": self.description,
            "repo": self.repo_id, "size_bytes": self.size_bytes,
            "required_memory_bytes": self.required_memory_bytes, "tags": list(self.tags),
            "capabilities": list(self.capabilities), "quantization": self.quantization,
        }


def _parse_entry(i: int, raw: Any) -> CatalogModel:
    where = f"models[{i}]"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: must be an object")
    try:
        model_id = normalize_model_id(raw.get("id"))
    except InvalidModelId as exc:
        raise CatalogError(f"{where}: invalid id {raw.get('id')!r}: {exc}") from None
    where = f"models[{i}] ({model_id})"
    source = raw.get("source")
    if source not in SOURCES:
        raise CatalogError(f"{where}: unknown source {source!r} (expected one of "
                           f"{', '.join(sorted(SOURCES))})")
    repo_id = raw.get("repo_id")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CatalogError(f"{where}: source {source} needs a repo_id like 'org/name'")
    artifacts_raw = raw.get("artifacts")
    if not isinstance(artifacts_raw, list) or not artifacts_raw:
        raise CatalogError(f"{where}: needs at least one artifact")
    artifacts = []
    for j, art in enumerate(artifacts_raw):
        aw = f"{where}.artifacts[{j}]"
        if not isinstance(art, dict) or not isinstance(art.get("filename"), str):
            raise CatalogError(f"{aw}: needs a filename")
        filename = art["filename"]
        try:
            safe_file_name(filename)
        except InvalidFileName as exc:
            raise CatalogError(f"{aw}: filename {filename!r} {exc}") from None
        size = art.get("size_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CatalogError(f"{aw}: size_bytes must be a non-negative integer")
        sha = art.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise CatalogError(f"{aw}: sha256 must be 64 hex characters")
        artifacts.append(Artifact(filename, size, sha.lower() if sha else None))
    vram = raw.get("required_vram_mb")
    if not isinstance(vram, int) or isinstance(vram, bool) or vram <= 0:
        raise CatalogError(f"{where}: required_vram_mb must be a positive integer")
    kv = raw.get("kv_cache_bytes_per_token", 0)
    if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0:
        raise CatalogError(f"{where}: kv_cache_bytes_per_token must be a non-negative integer")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise CatalogError(f"{where}: tags must be a list of strings")
    return CatalogModel(
        id=model_id, name=str(raw.get("name") or model_id),
        description=str(raw.get("description") or ""), source=source, repo_id=repo_id,
        revision=str(raw.get("revision") or "main"), artifacts=tuple(artifacts),
        required_vram_mb=vram, tags=tuple(tags),
        capabilities=tuple(raw.get("capabilities") or ()),
        quantization=raw.get("quantization"), kv_cache_bytes_per_token=kv,
    )


def parse_catalog(data: Any) -> dict[str, CatalogModel]:
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogError('the file must hold {"models": [...]}')
    models: dict[str, CatalogModel] = {}
    for i, raw in enumerate(data["models"]):
        model = _parse_entry(i, raw)
        if model.id in models:
            raise CatalogError(f"models[{i}]: duplicate id {model.id!r}")
        models[model.id] = model
    return models


def load_catalog(path: Path) -> dict[str, CatalogModel]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: invalid JSON: {exc}") from None
    try:
        return parse_catalog(data)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None


class Catalog:
    """The catalog of one file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._models = load_catalog(path)

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def models(self) -> dict[str, CatalogModel]:
        mtime = self._stat()
        if mtime != self._mtime and mtime is not None:
            with self._lock:
                if mtime != self._mtime:
                    self._mtime = mtime
                    try:
                        self._models = load_catalog(self.path)
                    except CatalogError as exc:
                        # A half-saved edit must not take the API down: keep serving the
                        # last good catalog and say why the new one was refused.
                        log.error("Catalog not reloaded, keeping the previous one: %s", exc)
        return self._models

    def get(self, model_id: str) -> CatalogModel | None:
        return self.models().get(model_id)

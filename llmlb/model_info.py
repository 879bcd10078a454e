"""How models are described to clients: OpenAI model objects (ST-6), manifests (ST-7) and
the files a manifest lists."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from . import errors
from .balancer.reports import ModelEntry
from .catalog import CatalogModel
from .storage import InvalidFileName, InvalidModelId, LocalModel, normalize_model_id, path_inside


def model_object(entry: ModelEntry, nodes: list[str]) -> dict:
    """A model for ``/v1/models``, with the nodes that have it ready."""
    return {**entry.to_json(), "nodes": nodes}


def catalog_object(entry: CatalogModel, status: str) -> dict:
    """A catalog model that is not on disk yet: requesting it downloads it. ``status`` is
    the resolver's (not_downloaded, downloading, error)."""
    return {
        "id": entry.id, "object": "model", "created": 0, "owned_by": "catalog",
        "format": entry.format, "size_bytes": entry.size_bytes, "status": status,
        "nodes": [],
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_files(model: LocalModel) -> list[tuple[str, int]]:
    """Every file a node needs to run the model: artifacts and their companions
    (config, tokenizer), as (relative path, size), without llmlb's dot files.

    A symlink counts only when it leads to a file inside the model's directory (the blob
    route serves nothing else): a dangling one, or one into the rest of the disk, is left
    out rather than described to whoever asks."""
    root = model.path.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(model.path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            try:
                target = full.resolve(strict=True)
                size = target.stat().st_size
            except (OSError, RuntimeError):  # dangling link, link loop, vanished file
                continue
            if target.is_relative_to(root) and target.is_file():
                files.append((str(full.relative_to(model.path)), size))
    return files


def manifest(model_id: str, local: LocalModel | None, entry: CatalogModel | None,
             hf_endpoint: str, blob_base: str) -> dict:
    """The manifest nodes sync from: the files on disk when the balancer has the model,
    else the catalog's artifacts with their Hugging Face URLs."""
    repo = entry.repo_id if entry else None
    if local is not None:
        artifacts = set(local.artifacts)
        known = {a.filename: a for a in entry.artifacts} if entry else {}
        files = []
        for rel, size in model_files(local):
            item = {"filename": rel, "format": local.format if rel in artifacts else "support",
                    "size_bytes": size,
                    "url": f"{blob_base}/{quote(model_id)}/{quote(rel)}"}
            if rel in known and known[rel].sha256:
                item["sha256"] = known[rel].sha256
            files.append(item)
        created = _iso(local.created)
    else:
        assert entry is not None
        files = []
        for art in entry.artifacts:
            item = {"filename": art.filename, "format": entry.format,
                    "size_bytes": art.size_bytes,
                    "url": f"{hf_endpoint}/{entry.repo_id}/resolve/{quote(entry.revision)}/"
                           f"{quote(art.filename)}"}
            if art.sha256:
                item["sha256"] = art.sha256
            files.append(item)
        created = None
    return {"model_id": model_id, "repo": repo, "files": files, "created_at": created}


def blob_path(rest: str, find: Callable[[str], LocalModel | None]) -> Path:
    """The file named by ``<model-id>/<filename>`` (either may contain '/') among the models
    ``find`` knows, refusing anything outside the model's directory and llmlb's own dot
    files."""
    parts = rest.split("/")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            model_id = normalize_model_id("/".join(parts[:cut]))
        except InvalidModelId:
            continue
        model = find(model_id)
        if model is None:
            continue
        name = "/".join(parts[cut:])
        try:  # NUL bytes, '..', dot files, symlinks leading outside: never a path
            path = path_inside(model.path, name)
        except InvalidFileName as exc:
            raise errors.invalid_request(f"Invalid file name {name!r}: {exc}",
                                         "filename") from None
        if path.is_file():
            return path
        raise errors.file_not_found(model_id, name)
    raise errors.model_not_found("/".join(parts[:-1]), in_catalog_hint=False)

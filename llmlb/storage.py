"""Model storage: ids, paths, format detection and listing. No network, no Flask.

Models are plain directories, ``<models_dir>/<model-id>/<artifacts>`` (ST-1). The id is checked
before any file system access (ST-3), so no id can reach outside the model roots. Directories
whose name starts with a dot (``.locks``, ``.downloads``) belong to llmlb and are never models.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from . import errors

MAX_ID_LENGTH = 256
MAX_NAME_BYTES = 255  # one path segment on ext4, xfs, btrfs (NAME_MAX)
MAX_FILE_NAME_LENGTH = 1024
MAX_DEPTH = 4  # "org/name" ids nest; deeper trees are not scanned for models

# Format name -> artifact suffixes, in the order formats are preferred when a directory holds
# several. Engine plugins may add formats (see plugins.format_table).
BUILTIN_FORMATS: dict[str, tuple[str, ...]] = {
    "metal": (".metal.bin",),
    "gguf": (".gguf",),
    "safetensors": (".safetensors",),
    "onnx": (".onnx",),
}
# Hugging Face ONNX exports keep the graph in onnx/; the tokenizer and config stay at the root.
ARTIFACT_SUBDIRS = ("onnx",)

_SEGMENT = re.compile(r"[a-z0-9_\-][a-z0-9_.\-]*")


class InvalidModelId(ValueError):
    """The id breaks a rule of ST-3; the message names the reason."""


_PLAIN_ID = re.compile(r"[A-Za-z0-9_\-](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_\-])?")


def normalize_model_id(raw: object) -> str:
    """Check a model id and return it lower-cased, or raise InvalidModelId with the reason."""
    if isinstance(raw, str) and len(raw) <= MAX_ID_LENGTH and _PLAIN_ID.fullmatch(raw):
        return raw.lower()  # the common one-segment id: nothing else can be wrong with it
    if not isinstance(raw, str):
        raise InvalidModelId("must be a string")
    if raw == "":
        raise InvalidModelId("is empty")
    if len(raw) > MAX_ID_LENGTH:
        raise InvalidModelId(f"is longer than {MAX_ID_LENGTH} characters ({len(raw)})")
    for ch in raw:
        if unicodedata.category(ch).startswith("C"):
            raise InvalidModelId(f"contains a control character (U+{ord(ch):04X})")
        if not ch.isascii():
            raise InvalidModelId(f"contains a non-ASCII character '{ch}'")
    decoded = unquote(raw)
    if ".." in raw.replace("\\", "/").split("/") or ".." in decoded.replace("\\", "/").split("/"):
        raise InvalidModelId("contains path traversal")
    if "\\" in raw:
        raise InvalidModelId("contains a backslash")
    if raw.startswith("/"):
        raise InvalidModelId("is an absolute path")
    if raw.endswith("/"):
        raise InvalidModelId("ends with '/'")
    if "//" in raw:
        raise InvalidModelId("contains an empty path segment")
    model_id = raw.lower()
    for segment in model_id.split("/"):
        if segment.startswith(".") or segment.endswith("."):
            raise InvalidModelId(f"segment '{segment}' starts or ends with '.'")
        if not _SEGMENT.fullmatch(segment):
            bad = next(ch for ch in segment if not (ch.isalnum() or ch in "-_."))
            raise InvalidModelId(f"contains the character '{bad}' (allowed: letters, digits, "
                                 "'-', '_', '.', '/')")
    return model_id


def requested_model_id(raw: object) -> str:
    """A model id from a request (URL or body), normalised, or the 400 ``invalid_model_id``
    that names the reason: the one check every route and the balancer share."""
    try:
        return normalize_model_id(raw)
    except InvalidModelId as exc:
        raise errors.invalid_model_id(str(exc)) from None


class InvalidFileName(ValueError):
    """A file name from outside (a catalog, a manifest, a URL) that must not become a path."""


def safe_file_name(raw: object) -> str:
    """Check a model file's relative name (``model.gguf``, ``onnx/model.onnx``) before any
    path is built from it: a relative path of plain segments, none empty, ``.``, ``..`` or
    hidden (llmlb's own ``.locks``/``.downloads`` are dot names), no backslash, no control
    character (NUL included), each segment short enough for a file system."""
    if not isinstance(raw, str) or not raw:
        raise InvalidFileName("must be a non-empty string")
    if len(raw) > MAX_FILE_NAME_LENGTH:
        raise InvalidFileName(f"is longer than {MAX_FILE_NAME_LENGTH} characters")
    for ch in raw:
        if unicodedata.category(ch).startswith("C"):
            raise InvalidFileName(f"contains a control character (U+{ord(ch):04X})")
    if raw.startswith("/") or "\\" in raw:
        raise InvalidFileName("must be a relative path with '/' separators")
    for segment in raw.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidFileName("contains an empty, '.' or '..' segment")
        if segment.startswith("."):
            raise InvalidFileName(f"segment '{segment}' is hidden (starts with '.')")
        if len(segment.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidFileName(f"has a segment longer than {MAX_NAME_BYTES} bytes")
    return raw


def path_inside(root: Path, name: str) -> Path:
    """``root/name`` for a name that passed ``safe_file_name``, checked once more against
    the resolved root (symlinks included): nothing outside ``root`` is ever returned."""
    path = root.joinpath(*safe_file_name(name).split("/"))
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidFileName("leads outside its directory")
    return path


@dataclass(frozen=True)
class LocalModel:
    """A model directory that can be served."""

    id: str
    path: Path
    format: str
    artifacts: tuple[str, ...]  # paths relative to ``path``
    size_bytes: int
    created: int
    source: str  # "local" | "shared"
    fingerprint: tuple = field(compare=False, repr=False, default=())


def _artifacts(directory: str, formats: Mapping[str, tuple[str, ...]],
               ) -> tuple[str, list[tuple[str, os.stat_result]]] | None:
    """(format, [(relative path, stat)]) of the first format with files in directory."""
    for sub in ("", *ARTIFACT_SUBDIRS):
        try:
            with os.scandir(os.path.join(directory, sub) if sub else directory) as it:
                entries = [e for e in it if not e.name.startswith(".") and e.is_file()]
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for fmt, suffixes in formats.items():
            matches = sorted((e for e in entries if e.name.lower().endswith(suffixes)),
                             key=lambda e: e.name)
            if matches:
                return fmt, [(f"{sub}/{e.name}" if sub else e.name, e.stat())
                             for e in matches]
    return None


def detect_format(directory: Path, formats: Mapping[str, tuple[str, ...]] = BUILTIN_FORMATS,
                  ) -> tuple[str, list[Path]] | None:
    """The one place formats are detected: (format, artifact files) or None if not a model.

    Artifacts at the top of the directory win; the subdirectories that exports use
    (``onnx/``) are looked into only when the top holds none."""
    found = _artifacts(str(directory), formats)
    if found is None:
        return None
    return found[0], [directory / rel for rel, _ in found[1]]


def describe(model_id: str, directory: Path, source: str,
             formats: Mapping[str, tuple[str, ...]] = BUILTIN_FORMATS) -> LocalModel | None:
    # Plain strings and DirEntry stats: listing hundreds of models stays in milliseconds.
    found = _artifacts(str(directory), formats)
    if found is None:
        return None
    fmt, stats = found
    return LocalModel(
        id=model_id, path=directory, format=fmt,
        artifacts=tuple(rel for rel, _ in stats),
        size_bytes=sum(st.st_size for _, st in stats),
        created=int(max((st.st_mtime for _, st in stats), default=0)),
        source=source,
        fingerprint=tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in stats),
    )


_names_cache: dict[str, tuple[int, dict[str, str]]] = {}
_names_lock = threading.Lock()


def _lower_names(directory: Path) -> dict[str, str] | None:
    """Lower-cased name -> real name of the subdirectories, re-read only when the directory
    changes (its mtime moves whenever an entry is added, removed or renamed)."""
    try:
        mtime = directory.stat().st_mtime_ns
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    key = str(directory)
    cached = _names_cache.get(key)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        with os.scandir(directory) as it:
            names = {e.name.lower(): e.name for e in it if e.is_dir()}
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    with _names_lock:
        _names_cache[key] = (mtime, names)
    return names


def model_dir(root: Path, model_id: str) -> Path | None:
    """The directory of a (validated) id under root, matching case-insensitively."""
    segments = model_id.split("/")
    if any(len(s) > MAX_NAME_BYTES for s in segments):
        return None  # a valid id (ST-3 allows 256 characters) no file system can hold
    exact = root.joinpath(*segments)
    try:
        if exact.is_dir():
            return exact
    except OSError:  # ENAMETOOLONG for a long path, EACCES: not a model here
        return None
    current = root
    for segment in segments:
        names = _lower_names(current)
        if names is None or segment not in names:
            return None
        current = current / names[segment]
    return current


def find_model(root: Path | None, model_id: str, source: str,
               formats: Mapping[str, tuple[str, ...]] = BUILTIN_FORMATS) -> LocalModel | None:
    if root is None:
        return None
    directory = model_dir(root, model_id)
    return describe(model_id, directory, source, formats) if directory else None


def list_models(root: Path | None, source: str,
                formats: Mapping[str, tuple[str, ...]] = BUILTIN_FORMATS) -> list[LocalModel]:
    """Every servable model under root, found by walking at most MAX_DEPTH levels."""
    if root is None:
        return []
    found: list[LocalModel] = []

    def walk(directory: Path, prefix: str, depth: int) -> None:
        try:
            with os.scandir(directory) as it:
                entries = [e for e in it if not e.name.startswith(".") and e.is_dir()]
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                model_id = normalize_model_id(rel)
            except InvalidModelId:
                continue
            model = describe(model_id, Path(entry.path), source, formats)
            if model is not None:
                found.append(model)
            elif depth < MAX_DEPTH:
                walk(Path(entry.path), rel + "/", depth + 1)

    walk(root, "", 1)
    return sorted(found, key=lambda m: m.id)


def merged_listing(roots: Iterable[tuple[Path | None, str]],
                   formats: Mapping[str, tuple[str, ...]] = BUILTIN_FORMATS) -> list[LocalModel]:
    """Models from several roots; the first root that has an id wins (local before shared)."""
    seen: dict[str, LocalModel] = {}
    for root, source in roots:
        for model in list_models(root, source, formats):
            seen.setdefault(model.id, model)
    return sorted(seen.values(), key=lambda m: m.id)

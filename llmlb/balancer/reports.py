"""What a member of the cluster says about itself, typed: a node's report (sent with its
registration and each heartbeat) and an external endpoint's (the balancer's own check of it).

This is the one module that knows the reports' keys. A report is parsed and checked once
where it enters (a registration, a heartbeat, an endpoint check, a row read back from the
registry) and read as attributes everywhere else; a malformed one is refused with a
``ReportError`` naming the field (``report.models[0].id``), never stored, so nothing a member
sends can break a reader (SC-8).

Parsing is strict about types and bounds, lenient about presence: a key a node leaves out
takes its default (an older node), a key this llmlb does not know is dropped (a newer node).
Names (ids, formats) longer than ``MAX_TEXT`` are refused, other text (an error message) is
cut there; lists hold at most ``MAX_ITEMS``. ``to_json()`` gives the wire form back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ..hardware import Gpu, Memory, models_memory

MAX_ITEMS = 10_000  # models, downloads, engines… in one report
MAX_TEXT = 1024  # characters of one string (a model id, an error message…)
MAX_COUNT = 2**63 - 1

T = TypeVar("T")


class ReportError(ValueError):
    """A report that does not have the shape it must; ``field`` names the culprit."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field, self.why = field, why


class _Object:
    """A JSON object being read, with the path of its fields for the errors."""

    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, dict):
            raise ReportError(path, "must be a JSON object")
        self.raw, self.path = raw, path

    def _at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def count(self, key: str, default: int = 0) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise ReportError(self._at(key), "must be a whole number, 0 or more")
        return value

    def optional_count(self, key: str) -> int | None:
        return None if self.raw.get(key) is None else self.count(key)

    def integer(self, key: str, default: int = 0) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_COUNT:
            raise ReportError(self._at(key), "must be a whole number")
        return value

    def number(self, key: str, default: float = 0.0, low: float = 0.0,
               high: float = float(MAX_COUNT)) -> float:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or not low <= value <= high:
            raise ReportError(self._at(key), f"must be a number from {low:g} to {high:g}")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.raw.get(key) is None else self.number(key)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ReportError(self._at(key), "must be true or false")
        return value

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        """Text; ``required`` makes it a name: present, not empty, not cut."""
        value = self.raw.get(key)
        if value is None:
            if required:
                raise ReportError(self._at(key), "is missing")
            return default
        return _text(value, self._at(key), allow_empty=not required, name=required)

    def optional_text(self, key: str) -> str | None:
        return None if self.raw.get(key) is None else self.text(key)

    def items(self, key: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
        value = self.raw.get(key)
        if value is None:
            return ()
        if not isinstance(value, list | tuple):  # a tuple: a report's own to_json()
            raise ReportError(self._at(key), "must be a JSON array")
        if len(value) > MAX_ITEMS:
            raise ReportError(self._at(key), f"must hold at most {MAX_ITEMS} items")
        return tuple(parse(item, f"{self._at(key)}[{i}]") for i, item in enumerate(value))

    def texts(self, key: str) -> tuple[str, ...]:
        return self.items(key, lambda v, at: _text(v, at))


def _text(value: object, at: str, *, allow_empty: bool = True, name: bool = False) -> str:
    """A string; a name (an id, a format) must fit MAX_TEXT, any other text is cut there."""
    if not isinstance(value, str):
        raise ReportError(at, "must be a string")
    if not value and not allow_empty:
        raise ReportError(at, "must not be empty")
    if len(value) > MAX_TEXT:
        if name:
            raise ReportError(at, f"must be at most {MAX_TEXT} characters")
        return value[:MAX_TEXT]
    return value


def _json(value: object) -> dict[str, Any]:
    return asdict(value)  # type: ignore[call-overload]


# --- the parts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """A model a member has ready, as an OpenAI model object (``format`` and ``size_bytes``
    only from llmlb nodes)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    format: str | None = None
    size_bytes: int | None = None
    status: str = "ready"

    @classmethod
    def parse(cls, raw: object, path: str) -> ModelEntry:
        o = _Object(raw, path)
        return cls(o.text("id", required=True), o.text("object", "model"), o.integer("created"),
                   o.text("owned_by"), o.optional_text("format"), o.optional_count("size_bytes"),
                   o.text("status", "ready"))

    @classmethod
    def listed(cls, raw: object, owner: str) -> ModelEntry | None:
        """A model of an OpenAI ``GET /models`` answer (a foreign server's, so lenient): None
        when it has no usable id; other fields of the wrong type take their defaults."""
        if not isinstance(raw, dict):
            return None
        model_id, created, owned_by = raw.get("id"), raw.get("created"), raw.get("owned_by")
        if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_TEXT:
            return None
        return cls(model_id, created=created if isinstance(created, int)
                   and not isinstance(created, bool) and abs(created) <= MAX_COUNT else 0,
                   owned_by=owned_by if isinstance(owned_by, str) and owned_by
                   and len(owned_by) <= MAX_TEXT else owner)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in _json(self).items() if v is not None}


def _gpu(raw: object, path: str) -> Gpu:
    o = _Object(raw, path)
    return Gpu(o.count("index"), o.text("name"), o.text("uuid"), o.count("memory_total_bytes"),
               o.count("memory_free_bytes"))


@dataclass(frozen=True)
class Hardware:
    """What a node runs models with: GPUs (NVML), else CPU and RAM."""

    device: str = "cpu"
    gpu_count: int = 0
    gpus: tuple[Gpu, ...] = ()
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    cpu_count: int = 0
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0

    @classmethod
    def parse(cls, raw: object, path: str = "hardware") -> Hardware:
        o = _Object(raw, path)
        return cls(o.text("device", "cpu"), o.count("gpu_count"), o.items("gpus", _gpu),
                   o.count("vram_total_bytes"), o.count("vram_free_bytes"), o.count("cpu_count"),
                   o.count("memory_total_bytes"), o.count("memory_free_bytes"))

    def memory(self) -> Memory:
        """The memory models run in: VRAM with GPUs, else RAM."""
        return models_memory(self.gpu_count, self.vram_total_bytes, self.vram_free_bytes,
                             self.device, self.memory_total_bytes, self.memory_free_bytes)


@dataclass(frozen=True)
class EngineInfo:
    """One engine of a node (``GET /v0/engines``' row)."""

    name: str
    format: str
    plugin: str | None = None
    active: bool = False
    available: bool = False
    reason: str | None = None
    device: str | None = None
    parallel: int | None = None
    parameters: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    #: each model gets up to ``parallel`` sequences, as many as its KV cache fits in memory
    parallel_auto: bool = False

    @classmethod
    def parse(cls, raw: object, path: str) -> EngineInfo:
        o = _Object(raw, path)
        return cls(o.text("name", required=True), o.text("format", required=True),
                   o.optional_text("plugin"), o.flag("active"), o.flag("available"),
                   o.optional_text("reason"), o.optional_text("device"),
                   o.optional_count("parallel"), o.texts("parameters"), o.texts("suffixes"),
                   o.flag("parallel_auto"))


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded on a node: requests it decodes now (``active``) and waiting, the most
    it decodes together (``parallel``: chosen from memory when ``parallel_auto``) and the
    memory their KV cache holds."""

    id: str
    format: str | None = None
    busy: bool = False
    active: int = 0
    parallel: int | None = None
    waiting: int = 0
    idle_seconds: float = 0.0
    parallel_auto: bool = False
    kv_cache_bytes: int | None = None

    @classmethod
    def parse(cls, raw: object, path: str) -> LoadedModel:
        o = _Object(raw, path)
        return cls(o.text("id", required=True), o.optional_text("format"), o.flag("busy"),
                   o.count("active"), o.optional_count("parallel"), o.count("waiting"),
                   o.number("idle_seconds"), o.flag("parallel_auto"),
                   o.optional_count("kv_cache_bytes"))


@dataclass(frozen=True)
class LoadSettings:
    """What a node loads every model with (LLMLB_CONTEXT_LENGTH, LLMLB_PARALLEL_SEQUENCES;
    None: unset): what a pull must fit besides the weights (``placement``)."""

    context_length: int | None = None
    parallel_sequences: int | None = None

    @classmethod
    def parse(cls, raw: object, path: str) -> LoadSettings:
        o = _Object(raw, path)
        return cls(o.optional_count("context_length"), o.optional_count("parallel_sequences"))


@dataclass(frozen=True)
class Download:
    """A download under way or failed on a node (its RS-7 status, without local paths)."""

    model_id: str
    status: str
    progress: float = 0.0
    downloaded_bytes: int = 0
    total_bytes: int = 0
    queued: bool = False
    error_message: str | None = None

    @classmethod
    def parse(cls, raw: object, path: str) -> Download:
        o = _Object(raw, path)
        return cls(o.text("model_id", required=True), o.text("status", required=True),
                   o.number("progress", high=1.0), o.count("downloaded_bytes"),
                   o.count("total_bytes"), o.flag("queued"), o.optional_text("error_message"))

    def to_json(self) -> dict[str, Any]:
        body = _json(self)
        if not self.queued:
            del body["queued"]
        if self.error_message is None:
            del body["error_message"]
        return body


# --- the reports ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeReport:
    """A node's report: hardware, engines and formats, models ready, loaded and being
    downloaded, requests in flight and queued, whether it may download from the catalog's
    sources, its llmlb version."""

    version: str | None = None
    hardware: Hardware | None = None
    engines: tuple[EngineInfo, ...] = ()
    formats: tuple[str, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    loaded: tuple[LoadedModel, ...] = ()
    downloads: tuple[Download, ...] = ()
    active_requests: int = 0
    queued_requests: int = 0
    can_download: bool = False
    load_options: LoadSettings = LoadSettings()

    @classmethod
    def parse(cls, raw: object, path: str = "report") -> NodeReport:
        """The report a node sent; raises ReportError naming the field that is wrong."""
        o = _Object(raw, path)
        hardware, options = o.raw.get("hardware"), o.raw.get("load_options")
        return cls(o.optional_text("version"),
                   None if hardware is None else Hardware.parse(hardware, o._at("hardware")),
                   o.items("engines", EngineInfo.parse), o.texts("formats"),
                   o.items("models", ModelEntry.parse), o.items("loaded", LoadedModel.parse),
                   o.items("downloads", Download.parse), o.count("active_requests"),
                   o.count("queued_requests"), o.flag("can_download"),
                   LoadSettings() if options is None
                   else LoadSettings.parse(options, o._at("load_options")))

    def to_json(self) -> dict[str, Any]:
        body = _json(self)
        body["models"] = [m.to_json() for m in self.models]
        body["downloads"] = [d.to_json() for d in self.downloads]
        return body


CHECKED_BY_BALANCER, CHECKED_BY_METRICS = "balancer", "metrics"


@dataclass(frozen=True)
class EndpointReport:
    """The balancer's last check of an external endpoint: its models, whether it answered,
    and its load where its own Prometheus metrics say it (``load_source: metrics``; the
    requests it holds for others are ``queued_requests``)."""

    healthy: bool
    models: tuple[ModelEntry, ...] = ()
    check_seconds: float = 0.0
    checked_at: float | None = None
    load_source: str = CHECKED_BY_BALANCER
    endpoint_running: int | None = None
    endpoint_waiting: int | None = None
    queued_requests: int = 0
    error: str | None = None

    @classmethod
    def parse(cls, raw: object, path: str = "report") -> EndpointReport:
        o = _Object(raw, path)
        source = o.text("load_source", CHECKED_BY_BALANCER)
        if source not in (CHECKED_BY_BALANCER, CHECKED_BY_METRICS):
            raise ReportError(o._at("load_source"), "must be 'balancer' or 'metrics'")
        return cls(o.flag("healthy", True), o.items("models", ModelEntry.parse),
                   o.number("check_seconds"), o.optional_number("checked_at"), source,
                   o.optional_count("endpoint_running"), o.optional_count("endpoint_waiting"),
                   o.count("queued_requests"), o.optional_text("error"))

    def to_json(self) -> dict[str, Any]:
        body = _json(self)
        body["models"] = [m.to_json() for m in self.models]
        return body


Report = NodeReport | EndpointReport


def model_ids(models: Iterable[ModelEntry]) -> list[str]:
    return sorted(m.id for m in models)

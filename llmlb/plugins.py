"""Plugin loading and the engine registry keyed by artifact format.

Built-in engines are registered as default plugins (``trylast``), then entry points of the
``llmlb.engines`` group, then every ``*.py`` in the plugin directories. pluggy calls later
registrations first, so for a given format the first engine returned wins: a plugin overrides
the built-in engine for its format. Each call of ``load_plugins`` builds a fresh manager, so
creating the app twice in one process registers nothing twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from engines.base import Availability, Engine, LoadOptions

from . import hookspecs
from .errors import without_paths
from .storage import BUILTIN_FORMATS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmlb.engines"


@dataclass(frozen=True)
class EngineEntry:
    format: str
    engine: Engine
    plugin: str  # the plugin that provided it ("builtin" for llmlb's own)


def _load_file(path: Path) -> ModuleType:
    # A stable, unique module name per file: dataclasses and pickling need the module in
    # sys.modules, and two plugin dirs may both hold an "example.py".
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"llmlb_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_plugins(plugin_dirs: tuple[Path, ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("llmlb")
    pm.add_hookspecs(hookspecs)
    from engines import builtin

    pm.register(builtin, name="builtin")
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for directory in plugin_dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                module = _load_file(path)
            except Exception:
                # One broken plugin must not take the server down; the log says which.
                log.exception("Plugin %s failed to import and was skipped", path)
                continue
            name = f"file:{path.resolve()}"
            if pm.get_plugin(name) is None:
                pm.register(module, name=name)
                log.info("Loaded plugin %s", path)
    return pm


class EngineRegistry:
    """Which engine serves which format, as the plugins decided."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._by_format: dict[str, EngineEntry] = {}
        self._all: list[EngineEntry] = []
        for impl in pm.hook.register_engines.get_hookimpls()[::-1]:
            # get_hookimpls() is in call order reversed; walk from most to least preferred.
            engines = impl.function() or []
            for engine in engines:
                for fmt in engine.formats:
                    entry = EngineEntry(fmt, engine, impl.plugin_name)
                    self._all.append(entry)
                    self._by_format.setdefault(fmt, entry)
        self._availability: dict[int, Availability] = {}

    def for_format(self, fmt: str) -> EngineEntry | None:
        return self._by_format.get(fmt)

    def availability(self, engine: Engine) -> Availability:
        cached = self._availability.get(id(engine))
        if cached is None:
            try:
                cached = engine.availability()
            except Exception as exc:  # an engine's check must not break the listing
                cached = Availability(False, f"availability check failed: {exc}")
            self._availability[id(engine)] = cached
        return cached

    def format_table(self) -> dict[str, tuple[str, ...]]:
        """Format -> suffixes: built-in formats in their order, then formats plugins add."""
        table = dict(BUILTIN_FORMATS)
        for fmt, entry in self._by_format.items():
            table[fmt] = tuple(entry.engine.formats.get(fmt) or table.get(fmt) or ())
        return {k: v for k, v in table.items() if v}

    def describe(self, options: LoadOptions | None = None) -> list[dict]:
        """One row per engine; ``parallel``: sequences one model decodes at once (1: calls
        to a model queue one behind the other)."""
        rows = []
        for entry in self._all:
            avail = self.availability(entry.engine)
            try:
                parallel = int(entry.engine.parallel(options or LoadOptions())) \
                    if avail.available else None
            except Exception as exc:  # an engine's answer must not break the listing
                log.warning("Engine %s could not say its parallelism: %s", entry.engine.name, exc)
                parallel = 1
            rows.append({
                "name": entry.engine.name, "format": entry.format, "plugin": entry.plugin,
                "active": self._by_format.get(entry.format) is entry,
                "available": avail.available, "reason": avail.reason or None,
                "device": avail.device if avail.available else None,
                "parallel": parallel,
                # each model gets up to ``parallel``, as many as its KV cache fits in memory
                "parallel_auto": bool(parallel and parallel > 1
                                      and getattr(entry.engine, "parallel_from_memory", False)
                                      and (options or LoadOptions()).parallel_sequences is None),
                # the optional OpenAI parameters its models honour (others are a 400)
                "parameters": sorted(getattr(entry.engine, "parameters", ()) or ()),
                "suffixes": list(entry.engine.formats.get(entry.format, ())),
            })
        return rows


def public_row(row: dict) -> dict:
    """An engine's row of ``describe`` without local paths (for keys that are not admin):
    a plugin file by its name, a reason without directories."""
    plugin = row["plugin"]
    if plugin.startswith("file:"):
        plugin = "file:" + Path(plugin[5:]).name
    reason = row["reason"] and without_paths(row["reason"])
    return {**row, "plugin": plugin, "reason": reason}

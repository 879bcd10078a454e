"""Metal-optimised models (``.metal.bin``): Apple Silicon only.

The format comes from llmlb's C++ ancestor. No Python runtime for it exists yet, so this engine
reports itself unavailable with the reason, and a request for such a model gets a clear 503
instead of a crash; a plugin that brings a runtime can take the format over.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from .base import Availability, Engine, EngineError, LoadedModel, LoadOptions


class MetalEngine(Engine):
    name = "metal"
    formats = {"metal": (".metal.bin",)}

    def availability(self) -> Availability:
        if platform.system() != "Darwin" or platform.machine() != "arm64":
            return Availability(False, "Metal needs macOS on Apple Silicon (this is "
                                       f"{platform.system()}/{platform.machine()})")
        return Availability(False, "no Metal runtime for .metal.bin is installed; add an "
                                   "engine plugin that provides one")

    def load(self, model_dir: Path, artifacts: Sequence[Path],
             options: LoadOptions = LoadOptions()) -> LoadedModel:  # noqa: B008
        raise EngineError(self.availability().reason)

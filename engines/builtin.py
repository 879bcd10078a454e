"""llmlb's own engines, registered as a default plugin that any other plugin can override."""

from __future__ import annotations

from llmlb.hookspecs import hookimpl

from .gguf import GGUFEngine
from .metal import MetalEngine
from .onnx import OnnxEngine
from .safetensors import SafetensorsEngine


@hookimpl(trylast=True)
def register_engines():
    return [GGUFEngine(), SafetensorsEngine(), OnnxEngine(), MetalEngine()]

"""What a machine has to run models with, as nodes report it and the balancer reads it: its
memory for models (VRAM with GPUs, else RAM) and its GPUs. The node measures them
(``node/hardware.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Memory:
    kind: str  # "gpu" | "system"
    total_bytes: int
    free_bytes: int
    device: str


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int


def memory_of(hardware: dict) -> Memory:
    """The memory models run in, from a ``describe()`` report: VRAM with GPUs, else RAM."""
    if hardware.get("gpu_count"):
        return Memory("gpu", int(hardware["vram_total_bytes"]), int(hardware["vram_free_bytes"]),
                      str(hardware.get("device", "gpu")))
    return Memory("system", int(hardware.get("memory_total_bytes", 0)),
                  int(hardware.get("memory_free_bytes", 0)), "cpu")

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


def models_memory(gpu_count: int, vram_total: int, vram_free: int, device: str,
                  ram_total: int, ram_free: int) -> Memory:
    """The memory models run in: VRAM with GPUs, else RAM."""
    if gpu_count:
        return Memory("gpu", vram_total, vram_free, device)
    return Memory("system", ram_total, ram_free, "cpu")

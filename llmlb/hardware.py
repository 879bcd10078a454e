"""What this node has to run models with: GPU memory when a CUDA GPU is there, else system
memory (HB-2 counts it as the node's memory on a CPU-only node)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import psutil

from engines.base import nvidia_driver_present


@dataclass(frozen=True)
class Memory:
    kind: str  # "gpu" | "system"
    total_bytes: int
    free_bytes: int
    device: str


def node_memory() -> Memory:
    # Importing torch takes a second: only ask it when an NVIDIA driver is there at all.
    if nvidia_driver_present() and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            free = total = 0
            for i in range(torch.cuda.device_count()):
                f, t = torch.cuda.mem_get_info(i)
                free, total = free + f, total + t
            return Memory("gpu", total, free, torch.cuda.get_device_name(0))
    vm = psutil.virtual_memory()
    return Memory("system", vm.total, vm.available, "cpu")

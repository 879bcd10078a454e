"""What this machine has to run models with: its GPUs through NVML (``nvidia-ml-py``) when an
NVIDIA driver is present, its CPUs and system memory through ``psutil`` always. A node reports
``describe()`` to its balancer; ``node_memory()`` is the memory a pull must fit in (HB-2 counts
system memory as the node's memory on a CPU-only node). The shapes are ``llmlb/hardware.py``'s."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict

import psutil

from engines.base import nvidia_driver_present

from ..hardware import Gpu, Memory, models_memory

log = logging.getLogger(__name__)


_nvml_lock = threading.Lock()
_nvml_state: dict[str, bool] = {}


def _nvml():  # noqa: ANN202 - the pynvml module, or None
    """pynvml, initialised once per process; None without a driver or the library."""
    with _nvml_lock:
        if "ok" not in _nvml_state:
            _nvml_state["ok"] = False
            if nvidia_driver_present():
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    _nvml_state["ok"] = True
                except Exception as exc:  # no NVML library, or a driver/library mismatch
                    log.warning("NVIDIA driver found but NVML is unusable: %s", exc)
        if not _nvml_state["ok"]:
            return None
    import pynvml

    return pynvml


def _visible(gpus: list[Gpu]) -> list[Gpu]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves to this process (NVML itself ignores it)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return gpus
    chosen = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = [g for g in gpus if (item.isdigit() and g.index == int(item))
                 or (not item.isdigit() and g.uuid.startswith(item))]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.extend(g for g in match if g not in chosen)
    return chosen


def gpus() -> list[Gpu]:
    """The NVIDIA GPUs this process may use, with their memory now; [] without any."""
    nvml = _nvml()
    if nvml is None:
        return []
    found = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            found.append(Gpu(i, name.decode() if isinstance(name, bytes) else name,
                             uuid.decode() if isinstance(uuid, bytes) else uuid,
                             int(memory.total), int(memory.free)))
    except Exception as exc:  # a GPU fallen off the bus must not break the report
        log.warning("NVML query failed: %s", exc)
        return []
    return _visible(found)


def describe() -> dict:
    """The hardware part of a node's report: GPUs (NVML) and CPU/RAM (psutil)."""
    vm = psutil.virtual_memory()
    found = gpus()
    return {
        "device": found[0].name if found else "cpu",
        "gpu_count": len(found),
        "gpus": [asdict(g) for g in found],
        "vram_total_bytes": sum(g.memory_total_bytes for g in found),
        "vram_free_bytes": sum(g.memory_free_bytes for g in found),
        "cpu_count": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "memory_total_bytes": int(vm.total),
        "memory_free_bytes": int(vm.available),
    }


def node_memory() -> Memory:
    found = gpus()
    vm = psutil.virtual_memory()
    return models_memory(len(found), sum(g.memory_total_bytes for g in found),
                         sum(g.memory_free_bytes for g in found),
                         found[0].name if found else "cpu", int(vm.total), int(vm.available))

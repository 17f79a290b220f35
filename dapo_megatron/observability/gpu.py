"""GPU memory and utilisation from NVML, as metrics; a clean no-op where there is no GPU.

    logger.log(step, {**stats, **gpu_metrics()})

Keys per NVML device index ``i`` (physical numbering, not ``CUDA_VISIBLE_DEVICES``):
``gpu/<i>/mem_used_gib``, ``gpu/<i>/mem_total_gib``, ``gpu/<i>/util_pct``, plus
``gpu/mem_used_gib_max`` over the node's devices.

NVML is initialised on the first call only; a failure (no ``pynvml`` package, no driver library,
no device) is remembered and every later call returns ``{}`` at once.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

GIB = 1024**3


class NvmlReader:
    """Lazily initialised NVML handle. ``read()`` returns the metrics dict (``{}`` when unavailable)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def read(self) -> Dict[str, float]:
        nvml = self._handle()
        if nvml is None:
            return {}
        try:
            return _device_metrics(nvml)
        except nvml.NVMLError:  # a device fell off the bus mid-run: report nothing rather than crash
            return {}

    def _handle(self) -> Optional[Any]:
        if not self._tried:
            self._tried = True
            self._nvml = _init_nvml()
        return self._nvml


def _init_nvml() -> Optional[Any]:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()  # NVMLError_LibraryNotFound on machines without the driver
    except pynvml.NVMLError:
        return None
    return pynvml


def _device_metrics(nvml: Any) -> Dict[str, float]:
    out: Dict[str, float] = {}
    used_max = 0.0
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        out[f"gpu/{i}/mem_used_gib"] = mem.used / GIB
        out[f"gpu/{i}/mem_total_gib"] = mem.total / GIB
        out[f"gpu/{i}/util_pct"] = float(util.gpu)
        used_max = max(used_max, mem.used / GIB)
    if out:
        out["gpu/mem_used_gib_max"] = used_max
    return out


_DEFAULT_READER = NvmlReader()


def gpu_metrics() -> Dict[str, float]:
    """Memory (GiB) and utilisation (%) of every GPU on this node; ``{}`` without NVML or GPUs."""
    return _DEFAULT_READER.read()

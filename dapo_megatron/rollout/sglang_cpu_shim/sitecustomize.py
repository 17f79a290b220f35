"""Loaded at start-up by every Python process of an SGLang server on CPU (this folder is put first on the
server's PYTHONPATH by :func:`dapo_megatron.rollout.sglang_server.server_env`), including the scheduler
and detokenizer processes SGLang spawns. It changes nothing in the trainer's own processes.

1. **Loadable weights.** On CPUs with AMX tiles, SGLang repacks linear weights into the AMX layout after
   loading (``sglang.srt.layers.amx_utils``), replacing the parameters with plain ones that have lost
   their ``weight_loader``. Every in-place weight update (``update_weights_from_tensor``/
   ``_distributed``/``_disk``) then fails with "'Parameter' object has no attribute 'weight_loader'".
   SGLang has no option or environment variable to keep the loadable layout; it reads the CPU's AMX
   support once, at import, from ``torch.cpu._is_amx_tile_supported``. Reporting "no AMX" there keeps
   the weights loadable; the server runs its torch paths with ``--attention-backend torch_native``.
2. **torchvision without its C ops.** SGLang imports torchvision while reading model configs (for
   vision models). The registry's torchvision wheels are CUDA builds whose ops library cannot load next
   to the CPU torch, and torchvision's import then fails on registering fake kernels for two ops it
   never defined. Text models use none of them: defining the two schemas lets the import finish; any
   real call of those ops still fails loudly (no kernel is registered).
3. **CPUs without AVX-512.** SGLang's CPU kernel library (``sgl_kernel``) is compiled for AVX-512/AMX
   and dies with SIGILL on other x86 CPUs (AMD Zen 3, for one). ``tools/sglang_env.sh`` probes it and
   leaves it uninstalled there. With AMX reported absent (1), SGLang calls none of its CPU kernels on
   a dense model's path, but a few modules import names from ``sgl_kernel`` at import time. When the
   library is not installed, a placeholder module answers those imports with functions that raise a
   clear error if they are ever called; nothing is computed by it.
4. **No orphans.** The server's first process asks the kernel to SIGTERM it when the process that
   started it (a trainer rank) dies, even by SIGKILL; SGLang then stops its own children. Only that
   process does it: the variable naming the parent is removed before SGLang spawns anything.
"""

import sys

try:
    import torch
except Exception:  # noqa: BLE001 - a process without torch has nothing to patch
    torch = None

_TORCHVISION_LIB = None


def _import_torchvision_without_ops() -> None:
    global _TORCHVISION_LIB
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        return  # not installed: SGLang reports what it misses itself
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401, F811


class _MissingKernel:
    """Stands for one ``sgl_kernel`` function on a CPU that cannot load the library."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"sgl_kernel.{self.name} was called, but SGLang's CPU kernels are not installed: they need a CPU with "
            "AVX-512 (see tools/sglang_env.sh). This server can only run models whose path needs no native kernel."
        )


def _placeholder_for_missing_kernels() -> None:
    import importlib.util
    import types

    if importlib.util.find_spec("sgl_kernel") is not None:
        return  # the real library is installed (and was probed loadable by tools/sglang_env.sh)
    module = types.ModuleType("sgl_kernel")
    module.__getattr__ = lambda name: _MissingKernel(name) if not name.startswith("__") else None
    module.DAPO_PLACEHOLDER = True
    sys.modules["sgl_kernel"] = module


def _die_with_parent() -> None:
    import os
    import signal

    parent = os.environ.pop("DAPO_SGLANG_PARENT_PID", None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_die_with_parent()
if torch is not None:
    torch.cpu._is_amx_tile_supported = lambda: False
    _import_torchvision_without_ops()
    _placeholder_for_missing_kernels()

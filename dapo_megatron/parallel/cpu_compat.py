"""Run megatron-core on a machine without CUDA (gloo, CPU tensors).

megatron-core hard-codes CUDA in many places (``device=torch.cuda.current_device()``,
``device="cuda"``, ``.cuda()``, the CUDA RNG tracker, type-string asserts in the optimizer). No
config flag turns that off, so this module patches the process at run time. It is applied only
when CUDA is unavailable; callers decide with :func:`needs_cpu_compat` (``init_distributed`` does).

Patch points, and why each is needed:

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``. megatron passes its result as
   ``device=`` (GlobalMemoryBuffer, p2p_communication, param_and_grad_buffer, ...), so returning the
   CPU device routes those allocations to host memory.
2. ``torch.cuda.synchronize``, ``current_stream`` and ``default_stream`` become no-ops (the streams
   are inert objects with ``wait_event``/``wait_stream``/``synchronize``/``record_event``).
   Newer releases (0.19) call ``current_stream()`` in the DDP gradient sync.
3. The CUDA RNG API maps onto the CPU generator: ``torch.cuda.get_rng_state``, ``set_rng_state``
   and ``manual_seed`` (also under ``torch.cuda.random``; ``manual_seed_all`` is left alone because
   ``torch.manual_seed`` calls it, and it is a no-op without CUDA), and megatron's
   ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``. Megatron's
   ``CudaRNGStatesTracker`` (``model_parallel_cuda_manual_seed``, dropout, weight init, activation
   recompute) then swaps CPU generator states, which keeps its per-TP-rank seeding semantics. The
   tracker warns "CPU RNG state changed within GPU RNG context" whenever it forks, because here the
   "GPU" state *is* the CPU state; a logging filter drops exactly that message.
4. One ``torch.overrides.TorchFunctionMode`` (:class:`_CudaToCpuMode`) stays pushed for the life of
   the thread. It
   - rewrites ``device="cuda"`` / ``device="cuda:N"`` / ``device=N`` keyword arguments to CPU
     (``pipeline_parallel/schedules.py`` total_num_tokens, ``transformer/utils.py``
     get_default_causal_mask, the optimizer and ``clip_grads.py``) and drops ``pin_memory``;
   - makes ``Tensor.cuda()`` return the tensor itself;
   - rewrites ``Tensor.to("cuda")`` (and a CUDA ``torch.device``) to CPU;
   - reports ``x.type()`` as ``torch.cuda.*``, because ``optimizer.py``, ``clip_grads.py`` and
     ``distrib_optimizer.py`` assert on strings such as ``'torch.cuda.FloatTensor'``.
5. Backward re-entry (the subtle one). While a TorchFunctionMode's handler runs, the mode is popped
   from the stack. ``Tensor.backward`` and ``torch.autograd.backward`` dispatch through the mode,
   so if the handler simply called them the whole backward pass - including activation recompute,
   which re-runs megatron forward code that allocates on ``"cuda"`` - would run without the mode.
   The handler therefore re-enters the mode and calls the autograd engine directly
   (``torch.autograd._make_grads`` + ``torch.autograd.graph._engine_run_backward``), bypassing the
   second dispatch that would otherwise recurse. These are private torch internals;
   ``tests/test_parallel_cpu_compat.py`` pins them so a torch upgrade fails loudly rather than
   silently training without the mode. ``torch.autograd.grad`` is not re-entered: megatron only
   uses it in CUDA-graph code, which never runs on CPU.

The function mode stack is thread-local: :func:`apply_cpu_compat` pushes the mode on the calling
thread only. Call it again from any other thread that runs megatron code (it is idempotent per
process for the patches and per thread for the mode).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["apply_cpu_compat", "needs_cpu_compat", "is_cpu_compat_applied"]

_CPU = torch.device("cpu")
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_patch_lock = threading.Lock()
_patched = False
_thread_state = threading.local()


def needs_cpu_compat() -> bool:
    """True when the process has no usable CUDA device, i.e. megatron needs the CPU layer."""
    return not torch.cuda.is_available()


def is_cpu_compat_applied() -> bool:
    """True when the process-wide patches are in place and the mode is active on this thread."""
    return _patched and getattr(_thread_state, "mode", None) is not None


def apply_cpu_compat() -> None:
    """Install the CPU compatibility layer (see the module docstring). Idempotent.

    Patches ``torch.cuda`` and megatron's RNG helpers once per process and pushes the
    device-rewriting TorchFunctionMode once per calling thread. Imports megatron-core.
    """
    global _patched
    with _patch_lock:
        if not _patched:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patched = True
    if getattr(_thread_state, "mode", None) is None:
        mode = _CudaToCpuMode()
        mode.__enter__()  # stays pushed for the life of this thread; never exited
        _thread_state.mode = mode


# ----------------------------------------------------------------------------- torch.cuda patches
class _InertStream:
    """Stands in for a CUDA stream: every synchronisation is already satisfied on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event

    def query(self) -> bool:
        return True


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _InertStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _InertStream()  # type: ignore[assignment]
    for namespace in (torch.cuda, torch.cuda.random):
        namespace.get_rng_state = _cpu_get_rng_state  # type: ignore[assignment]
        namespace.set_rng_state = _cpu_set_rng_state  # type: ignore[assignment]
        namespace.manual_seed = _cpu_manual_seed  # type: ignore[assignment]


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


def _patch_megatron_rng() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    # Looked up as module globals at call time (tracker.fork, CheckpointFunction), so rebinding works.
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    logging.getLogger(mrandom.__name__).addFilter(_DropRngWarning())


# ----------------------------------------------------------------------------- the function mode
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (torch.Tensor, torch.autograd.graph.GradientEdge)):
        return (value,)
    if isinstance(value, Mapping):
        return tuple(value.values())
    return tuple(value)


def _run_backward(
    tensors: Any,
    grad_tensors: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    grad_variables: Any = None,
    inputs: Any = None,
) -> None:
    """``torch.autograd.backward`` without its ``__torch_function__`` dispatch.

    Mirrors the body of ``torch.autograd.backward`` (torch 2.13) after its override check.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if grad_variables is not None:
        grad_tensors = grad_variables if grad_tensors is None else grad_tensors
    outputs = _as_tuple(tensors)
    input_tuple = _as_tuple(inputs)
    if inputs is not None and not input_tuple:
        raise RuntimeError("`inputs` argument to `backward()` cannot be empty.")
    grads = _make_grads(outputs, _tensor_or_tensors_to_tuple(grad_tensors, len(outputs)), is_grads_batched=False)
    if retain_graph is None:
        retain_graph = create_graph
    _engine_run_backward(
        outputs, grads, retain_graph, create_graph, input_tuple, allow_unreachable=True, accumulate_grad=True
    )


def _tensor_backward_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Bind ``Tensor.backward(self, gradient, retain_graph, create_graph, inputs)`` call arguments."""
    names = ("gradient", "retain_graph", "create_graph", "inputs")
    bound: dict[str, Any] = {"gradient": None, "retain_graph": None, "create_graph": False, "inputs": None}
    bound.update(zip(names, args[1:]))
    bound.update(kwargs)
    return {
        "tensors": args[0],
        "grad_tensors": bound["gradient"],
        "retain_graph": bound["retain_graph"],
        "create_graph": bound["create_graph"],
        "inputs": bound["inputs"],
    }


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while it is pushed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # The mode is popped while this handler runs; re-push it so code inside the backward
            # pass (activation recompute) still sees it, and call the engine without re-dispatch.
            with self:
                if func is torch.Tensor.backward:
                    return _run_backward(**_tensor_backward_args(args, kwargs))
                return _run_backward(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)

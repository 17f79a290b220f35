"""Moving the trainer's device state to host memory and back, in place (colocated rollouts).

A colocated rollout engine generates on the trainer's GPUs. While it does, the trainer's parameters,
gradients and Adam state have no use, so they leave the device: :class:`StateOffloader` copies each
*storage* to a host buffer (pinned on CUDA) and shrinks the device storage to 0 bytes
(``untyped_storage().resize_(0)``), then ``reload`` grows it back and copies the bytes in.

Why storages and not ``tensor.data`` swaps: megatron's DDP keeps every parameter and gradient as a
view into one contiguous buffer per dtype (``param_and_grad_buffer``), and the optimizer holds further
views into those buffers (``main_grad``, the distributed optimizer's shards, ``FP32Optimizer``'s params
*are* the model's). Resizing the shared storage keeps every one of those views valid, with the same
address after reload as far as any holder can tell; a ``.data`` swap would have to find and rebind
each of them. The same code runs on CPU (there the "device" is host memory, and the offload is a copy
that frees the original), so CPU tests exercise exactly this path.

Invariants:

* a storage is held once however many tensors view it (keyed by its StorageImpl);
* ``keep_contents=False`` frees without copying and reload zero-fills: for gradients, which every
  update zeroes before its first backward (``MegatronActor._zero_grads``), so nothing reads them
  between updates;
* a storage already held, or of 0 bytes, is skipped, so offloading groups in turn never re-copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor


@dataclass
class _Held:
    """One device storage while offloaded: ``nbytes`` to restore, its host copy (None: zero-fill)."""

    storage: torch.UntypedStorage
    nbytes: int
    host: Optional[Tensor]


def _key(storage: torch.UntypedStorage) -> int:
    # The address of the C++ StorageImpl: one per storage, shared by every view and kept across
    # resize_ (data_ptr changes on reload; the Python wrapper object is new on each call).
    return storage._cdata


def _bytes_view(storage: torch.UntypedStorage) -> Tensor:
    """A 1-D uint8 tensor over all of ``storage`` (for copy_ and zero_)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class StateOffloader:
    """Offloads groups of tensors' storages from ``device`` to host memory and reloads them.

    ``device``: the trainer's device (``cuda:N``) or ``cpu``. On CUDA only tensors on that device
    are moved (host tensors, e.g. torch Adam's ``step`` counters, stay); host buffers are pinned
    and kept between offloads, so each step pays the copies but not the pinning.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: Dict[int, _Held] = {}
        self._host: Dict[int, Tensor] = {}  # reusable host buffers, by storage

    @property
    def held_bytes(self) -> int:
        """Device bytes freed now (0 when everything is on the device)."""
        return sum(h.nbytes for h in self._held.values())

    def offload(self, tensors: Iterable[Tensor], *, keep_contents: bool = True, skip: Iterable[Tensor] = ()) -> int:
        """Free the device storage of every tensor of ``tensors`` (except those sharing a storage
        with ``skip``); copy its bytes to host first when ``keep_contents``. Returns bytes freed."""
        skipped = {_key(t.untyped_storage()) for t in skip}
        picked: Dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            st = t.untyped_storage()
            k = _key(st)
            if t.device != self.device or k in skipped or k in self._held or st.nbytes() == 0:
                continue
            if not st.resizable():
                raise RuntimeError(f"StateOffloader: a {tuple(t.shape)} {t.dtype} tensor's storage cannot be freed "
                                   "(not resizable: it was made from a numpy array or a file mapping)")  # fmt: skip
            picked[k] = st
        for k, st in picked.items():
            host = None
            if keep_contents:
                host = self._host_buffer(k, st.nbytes())
                host.copy_(_bytes_view(st), non_blocking=True)
            self._held[k] = _Held(st, st.nbytes(), host)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies must land before the memory goes back
        for k in picked:
            self._held[k].storage.resize_(0)
        return sum(self._held[k].nbytes for k in picked)

    def reload(self) -> int:
        """Give every held storage its bytes back on the device. Returns bytes restored."""
        total = 0
        for held in self._held.values():
            held.storage.resize_(held.nbytes)
            view = _bytes_view(held.storage)
            if held.host is None:
                view.zero_()
            else:
                view.copy_(held.host, non_blocking=True)  # ordered before any later kernel on the stream
            total += held.nbytes
        self._held.clear()
        return total

    def _host_buffer(self, key: int, nbytes: int) -> Tensor:
        buf = self._host.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._host[key] = buf
        return buf


def model_tensors(ddp_chunks: List) -> List[Tensor]:
    """The parameters of megatron DDP chunks and their contiguous param buffers (when allocated)."""
    out = [p for chunk in ddp_chunks for p in chunk.parameters()]
    for buf in _buffers(ddp_chunks):
        if buf.param_data is not None:
            out.append(buf.param_data)
    return out


def grad_tensors(ddp_chunks: List, optimizer) -> List[Tensor]:
    """DDP grad buffers, every ``main_grad`` view and every ``.grad`` the optimizer's params hold."""
    out = [buf.grad_data for buf in _buffers(ddp_chunks) if buf.grad_data is not None]
    out += [
        p.main_grad for chunk in ddp_chunks for p in chunk.parameters() if getattr(p, "main_grad", None) is not None
    ]
    out += [p.grad for p in _optimizer_params(optimizer) if p.grad is not None]
    return out


def optimizer_tensors(optimizer) -> List[Tensor]:
    """The torch optimizers' params (fp32 main params or shards) and every tensor of their state."""
    out = list(_optimizer_params(optimizer))
    for opt in _torch_optimizers(optimizer):
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor)]
    return out


def _buffers(ddp_chunks: List) -> List:
    return [b for chunk in ddp_chunks for b in list(chunk.buffers) + list(chunk.expert_parallel_buffers)]


def _torch_optimizers(optimizer) -> List:
    """The torch optimizers inside a megatron optimizer (a ChainedOptimizer holds several; a stub
    optimizer of a rank without parameters holds none)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def _optimizer_params(optimizer) -> List[Tensor]:
    return [p for opt in _torch_optimizers(optimizer) for g in opt.param_groups for p in g["params"]]

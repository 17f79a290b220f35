"""Moving HF-named weight buckets from the trainer to a rollout engine, with a weight version.

One sender interface (:class:`WeightSender`: ``send_bucket(named_tensors, version)``), three
transports:

* :class:`InProcessTransport` - the engine lives in this process (embedded HF engine, in-process
  vLLM): call its loader directly.
* :class:`BroadcastSender` / :class:`BroadcastReceiver` - ``torch.distributed`` broadcast over a
  standalone group made by :func:`create_update_group` (the SGLang ``/init_weights_update_group`` +
  ``/update_weights_from_distributed`` pattern; trainer rank 0 is group rank 0, the engine ranks
  follow). ``send``/``recv`` move bare tensors, the metadata travelling out of band (HTTP);
  ``send_bucket``/``recv_bucket`` also broadcast a small header with the version and metadata.
* :class:`CudaIpcSender` / :class:`CudaIpcReceiver` - colocated engine on the same GPU: the bucket
  is flattened into one GPU buffer per dtype and shared by CUDA IPC handle; no copy through host.

A bucket's tensors arrive in the order they were sent. :func:`tensor_checksum` lets the engine
check what it received against what the trainer sent.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Protocol, Sequence, Tuple

import torch
from torch import Tensor

NamedTensors = Sequence[Tuple[str, Tensor]]


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver must know to allocate a tensor: HF name, dtype (``"bfloat16"``), shape."""

    name: str
    dtype: str
    shape: Tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def metas_of(named_tensors: Iterable[Tuple[str, Tensor]]) -> List[TensorMeta]:
    return [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in named_tensors]


def tensor_checksum(named_tensors: Iterable[Tuple[str, Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in the given order (hex digest)."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(json.dumps([name, dtype_name(t.dtype), list(t.shape)]).encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class WeightSender(Protocol):
    def send_bucket(self, named_tensors: NamedTensors, version: int) -> None:
        """Deliver one bucket labelled with the policy ``version`` it belongs to."""


# ----------------------------------------------------------------------------- in-process
class InProcessTransport:
    """Calls ``load_fn(named_tensors, version)`` directly (no copy beyond what the loader does)."""

    def __init__(self, load_fn: Callable[[NamedTensors, int], Any]):
        self.load_fn = load_fn

    def send_bucket(self, named_tensors: NamedTensors, version: int) -> None:
        self.load_fn(list(named_tensors), int(version))


# ----------------------------------------------------------------------------- torch.distributed
def create_update_group(
    *,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    backend: str = "gloo",
    timeout_s: float = 300,
    group_name: str = "weight_update_group",
):
    """A process group of its own, separate from the default group, built exactly as SGLang builds the
    engine side of ``/init_weights_update_group`` (``sglang.srt.utils.init_custom_process_group``), so
    the trainer and real SGLang servers meet in one group:

    * a TCP store on ``master_address:master_port`` hosted by rank 0 (what SGLang's ``tcp://``
      rendezvous connects to). Built directly, not through ``rendezvous``: under torchrun that helper
      connects to the elastic agent's store instead (``TORCHELASTIC_USE_AGENT_STORE``), and the
      engines, which dial the given address, would wait for a store nobody hosts;
    * the store prefixed by ``group_name`` (no separator, as SGLang does);
    * ``torch.distributed``'s own group helper, with ranks mapped one to one.

    Rank 0 is the sender. The result works with ``torch.distributed.broadcast(t, src=0, group=g)``.
    This uses torch internals (``_new_process_group_helper``, ``_world``) because the peer does; they
    are covered by the transport and real-server tests.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend='nccl' needs a CUDA device; CPU machines use gloo")
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)  # fmt: skip
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, backend_options=None, timeout=timeout,
    )  # fmt: skip
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _broadcast(group: Any, t: Tensor, src: int = 0) -> None:
    """Global rank ``src`` sends ``t``, every other rank of ``group`` receives into it (in place). In
    an update group (:func:`create_update_group`) global and group ranks coincide; its sender is 0."""
    import torch.distributed as dist

    dist.broadcast(t, src=src, group=group)


def _header_tensor(metas: List[TensorMeta], version: int) -> Tensor:
    payload = json.dumps({"version": int(version), "metas": [[m.name, m.dtype, list(m.shape)] for m in metas]})
    return torch.frombuffer(bytearray(payload.encode()), dtype=torch.uint8)


class BroadcastSender:
    """Rank ``src`` (0: an update group's sender) broadcasts each tensor in order. ``device``: where
    tensors go before the broadcast (``cuda`` for NCCL)."""

    def __init__(self, group, device: Any = "cpu", src: int = 0):
        self.group, self.device, self.src = group, device, src

    def _bcast(self, t: Tensor) -> None:
        _broadcast(self.group, t, self.src)

    def send(self, named_tensors: NamedTensors) -> None:
        for _, t in named_tensors:
            self._bcast(t.detach().to(self.device).contiguous())

    def send_flat(self, flat: Tensor) -> None:
        """One broadcast of a whole bucket's bytes (SGLang's ``flattened_bucket`` load format)."""
        self._bcast(flat.to(self.device))

    def send_bucket(self, named_tensors: NamedTensors, version: int) -> None:
        """Header (length, then JSON with version and metas), then the tensors."""
        header = _header_tensor(metas_of(named_tensors), version).to(self.device)
        self._bcast(torch.tensor([header.numel()], dtype=torch.int64, device=self.device))
        self._bcast(header)
        self.send(named_tensors)


class BroadcastReceiver:
    """A rank of the group other than ``src``: receives what :class:`BroadcastSender` sends."""

    def __init__(self, group, device: Any = "cpu", src: int = 0):
        self.group, self.device, self.src = group, device, src

    def recv(self, metas: Sequence[TensorMeta]) -> List[Tuple[str, Tensor]]:
        out = []
        for m in metas:
            t = torch.empty(m.shape, dtype=dtype_of(m.dtype), device=self.device)
            _broadcast(self.group, t, self.src)
            out.append((m.name, t))
        return out

    def recv_bucket(self) -> Tuple[List[Tuple[str, Tensor]], int]:
        """One bucket sent by :meth:`BroadcastSender.send_bucket`: ``(named_tensors, version)``."""
        n = torch.empty(1, dtype=torch.int64, device=self.device)
        _broadcast(self.group, n, self.src)
        header = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        _broadcast(self.group, header, self.src)
        info = json.loads(bytes(header.cpu().numpy()).decode())
        metas = [TensorMeta(name, dtype, tuple(shape)) for name, dtype, shape in info["metas"]]
        return self.recv(metas), int(info["version"])


# ----------------------------------------------------------------------------- CUDA IPC
def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs CUDA (a GPU shared with the engine); no CUDA device is visible")


class CudaIpcSender:
    """Shares each bucket as flat GPU buffers (one per dtype) by CUDA IPC handle.

    ``deliver(payload: bytes, version)`` hands the pickled handles to the consumer (e.g. an HTTP
    call to the colocated engine) and must return only after the consumer has finished copying.

    Ordering hazard: the consumer maps *this process's* memory. The buffer must stay alive and
    unmodified until ``deliver`` returns; freeing or reusing it earlier lets the caching allocator
    hand the block to another tensor while the engine is still reading it, and the engine then
    silently loads garbage. :meth:`send_bucket` therefore drops its buffers only after ``deliver``.
    """

    def __init__(self, deliver: Callable[[bytes, int], Any], device: Any = None):
        _require_cuda("CudaIpcSender")
        self.deliver = deliver
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def pack(self, named_tensors: NamedTensors) -> Tuple[Dict[str, Tensor], List[Tuple[str, str, Tuple, int]]]:
        """Flatten into ``{dtype: 1-D buffer}`` plus ``[(name, dtype, shape, offset)]`` (elements)."""
        by_dtype: Dict[str, List[Tuple[str, Tensor]]] = {}
        for name, t in named_tensors:
            by_dtype.setdefault(dtype_name(t.dtype), []).append((name, t))
        buffers, layout = {}, []
        for dt, items in by_dtype.items():
            total = sum(t.numel() for _, t in items)
            buf = torch.empty(total, dtype=dtype_of(dt), device=self.device)
            offset = 0
            for name, t in items:
                buf[offset : offset + t.numel()].copy_(t.reshape(-1), non_blocking=True)
                layout.append((name, dt, tuple(t.shape), offset))
                offset += t.numel()
            buffers[dt] = buf
        torch.cuda.current_stream(self.device).synchronize()  # copies done before the peer reads
        return buffers, layout

    def send_bucket(self, named_tensors: NamedTensors, version: int) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        buffers, layout = self.pack(named_tensors)
        handles = {dt: reduce_tensor(buf) for dt, buf in buffers.items()}
        payload = pickle.dumps({"version": int(version), "handles": handles, "layout": layout})
        self.deliver(payload, int(version))
        del handles, buffers  # only now may the allocator reuse the memory (see the class docstring)


class CudaIpcReceiver:
    """Consumer side: opens the handles, copies every tensor out into memory of its own."""

    def __init__(self, device: Any = None):
        _require_cuda("CudaIpcReceiver")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)

    def load(self, payload: bytes) -> Tuple[List[Tuple[str, Tensor]], int]:
        """``(named_tensors, version)``; the returned tensors are copies, so the sender may free
        its buffers as soon as this returns (after the stream is synchronised here)."""
        info = pickle.loads(payload)
        shared = {dt: fn(*args) for dt, (fn, args) in info["handles"].items()}
        out = []
        for name, dt, shape, offset in info["layout"]:
            n = 1
            for s in shape:
                n *= s
            out.append((name, shared[dt][offset : offset + n].view(shape).to(self.device, copy=True)))
        torch.cuda.current_stream(self.device).synchronize()
        del shared
        return out, int(info["version"])

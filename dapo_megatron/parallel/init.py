"""Process-group start-up: rank and rendezvous from the launcher, then megatron's parallel state.

Order of use on every trainer rank::

    t = cfg.parallel.collective_timeout_s
    env = init_distributed(timeout_s=t)            # cpu:gloo,cuda:nccl on CUDA, gloo on CPU
    init_model_parallel(topology, seed=cfg.model.seed, timeout_s=t)
    ...
    shutdown()

The launcher is read from the environment once, by the pure :func:`dist_env_from_environ`:
torchrun's variables win, then SLURM's (``srun``), else a single local process.

``MASTER_PORT``: the TCP port of the rendezvous on ``MASTER_ADDR``. torchrun always sets it; under
SLURM with several tasks it defaults to 29500 (every rank must know it in advance). A lone process
(plain ``dapo-megatron train``, or one SLURM task) without ``MASTER_PORT`` takes any free port, so a
second job on the same machine does not collide. A rendezvous that fails raises
:class:`RendezvousError` naming ``MASTER_ADDR`` and ``MASTER_PORT``.

Backends: with CUDA the world is ``cpu:gloo,cuda:nccl`` -- one process group whose CPU tensors
and pickled objects (the rank-0 error flags, checkpoint nonces, CPU batch buffers) travel over gloo
and whose CUDA tensors travel over NCCL. Plain ``nccl`` refuses CPU tensors ("No backend type
associated with device type cpu"). Without CUDA it is ``gloo``. megatron's groups inherit it.

Timeouts: ``timeout_s`` (``parallel.collective_timeout_s``) bounds one collective of the world
and of megatron's groups; the rendezvous (ranks waiting for each other to start) has its own,
:data:`RENDEZVOUS_TIMEOUT_S`, so a short collective timeout never fails a slow start-up. Work that
only rank 0 does (rollout, eval, engine start-up) is waited for on the rendezvous store, not in a
collective (``parallel/rank0_wait.py``), so the collective timeout need not cover it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

import torch

from dapo_megatron.parallel.topology import Topology

__all__ = [
    "ANY_FREE_PORT",
    "DEFAULT_COLLECTIVE_TIMEOUT_S",
    "RENDEZVOUS_TIMEOUT_S",
    "DEFAULT_MASTER_PORT",
    "RendezvousError",
    "DistEnv",
    "default_backend",
    "dist_env_from_environ",
    "first_host_of_nodelist",
    "init_distributed",
    "init_model_parallel",
    "rendezvous_store",
    "shutdown",
]

DEFAULT_MASTER_PORT = 29500
# master_port of a lone process whose launcher set no MASTER_PORT: init_distributed binds any free one.
ANY_FREE_PORT = 0
# The library default of init_distributed; the trainer passes parallel.collective_timeout_s (whose
# default, in config_model.py, says why it is an hour).
DEFAULT_COLLECTIVE_TIMEOUT_S = 3600.0
# How long ranks wait for each other at start-up (srun starts nodes within minutes of each other).
RENDEZVOUS_TIMEOUT_S = 900.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")


class RendezvousError(RuntimeError):
    """The process group could not form at MASTER_ADDR:MASTER_PORT (port taken, host unreachable,
    ranks missing). The message names both and what to change."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the trainer world and how to reach rank 0.

    Fields:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of trainer processes.
        local_rank: rank on this node (selects the GPU).
        master_addr: host of the rendezvous (rank 0's node).
        master_port: TCP port of the rendezvous; :data:`ANY_FREE_PORT` (0) only for a lone
            process (``world_size == 1``), which then binds a free port.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"DistEnv.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv.rank={self.rank} is outside [0, world_size={self.world_size})")
        if self.local_rank < 0:
            raise ValueError(f"DistEnv.local_rank must be >= 0, got {self.local_rank}")
        lone_any = self.master_port == ANY_FREE_PORT and self.world_size == 1
        if not (0 < self.master_port < 65536 or lone_any):
            raise ValueError(
                f"DistEnv.master_port={self.master_port} is not a TCP port (0, any free port, only for one process)"
            )
        if not self.master_addr:
            raise ValueError("DistEnv.master_addr is empty")


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def _port_var(environ: Mapping[str, str], default: int) -> int:
    return _int_var(environ, "MASTER_PORT") if environ.get("MASTER_PORT", "").strip() else default


def first_host_of_nodelist(nodelist: str) -> str:
    """First host of a SLURM (possibly compressed) node list.

    ``"node[01-03,07],gpu5"`` -> ``"node01"``; ``"gpu5,node1"`` -> ``"gpu5"``;
    ``"rack[2-3]-n[04-05]"`` -> ``"rack2-n04"``. Zero padding of a range's start is kept.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("SLURM_JOB_NODELIST is empty")
    # The first host ends at the first comma outside brackets.
    depth = 0
    end = len(text)
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed SLURM node list {nodelist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            end = i
            break
    if depth > 0 and end == len(text):
        raise ValueError(f"malformed SLURM node list {nodelist!r}: unbalanced '['")
    first = text[:end]

    def expand_first(match: re.Match[str]) -> str:
        body = match.group(1)
        item = body.split(",", 1)[0].strip()
        start = item.split("-", 1)[0].strip()
        if not start.isdigit():
            raise ValueError(f"malformed SLURM node list {nodelist!r}: range item {item!r}")
        return start

    host = re.sub(r"\[([^\[\]]*)\]", expand_first, first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"malformed SLURM node list {nodelist!r}")
    return host


def dist_env_from_environ(environ: Mapping[str, str]) -> DistEnv:
    """Read rank, world size and rendezvous from launcher variables (pure).

    - torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (all
      five; ``LOCAL_RANK`` defaults to ``RANK`` when absent).
    - SLURM: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, and the first host of
      ``SLURM_JOB_NODELIST`` as the rendezvous; ``MASTER_ADDR`` / ``MASTER_PORT`` override when
      set, and the port defaults to :data:`DEFAULT_MASTER_PORT` (:data:`ANY_FREE_PORT` for one task).
    - Neither: one process, rank 0 of 1 on ``127.0.0.1`` (``MASTER_PORT`` or :data:`ANY_FREE_PORT`).

    Raises ``ValueError`` naming the missing variables when only part of a launcher's set is there.
    """
    torchrun_present = [v for v in ("RANK", "WORLD_SIZE") if v in environ]
    if torchrun_present:
        needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        missing = [v for v in needed if v not in environ]
        if missing:
            raise ValueError(
                f"partial torchrun environment: {', '.join(torchrun_present)} set but "
                f"{', '.join(missing)} missing (torchrun sets {', '.join(_TORCHRUN_VARS)})"
            )
        rank = _int_var(environ, "RANK")
        local_rank = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        return DistEnv(
            rank=rank,
            world_size=_int_var(environ, "WORLD_SIZE"),
            local_rank=local_rank,
            master_addr=environ["MASTER_ADDR"],
            master_port=_int_var(environ, "MASTER_PORT"),
        )

    slurm_present = [v for v in _SLURM_VARS if v in environ]
    if slurm_present:
        missing = [v for v in _SLURM_VARS if v not in environ]
        if missing:
            raise ValueError(
                f"partial SLURM environment: {', '.join(slurm_present)} set but {', '.join(missing)} missing "
                "(run the trainer under srun, or use torchrun)"
            )
        addr = environ.get("MASTER_ADDR") or first_host_of_nodelist(environ["SLURM_JOB_NODELIST"])
        lone = environ["SLURM_NTASKS"].strip() == "1"
        port = _port_var(environ, ANY_FREE_PORT if lone else DEFAULT_MASTER_PORT)
        return DistEnv(
            rank=_int_var(environ, "SLURM_PROCID"),
            world_size=_int_var(environ, "SLURM_NTASKS"),
            local_rank=_int_var(environ, "SLURM_LOCALID"),
            master_addr=addr,
            master_port=port,
        )

    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=_port_var(environ, ANY_FREE_PORT))  # fmt: skip


def default_backend(cuda: bool) -> str:
    """``"cpu:gloo,cuda:nccl"`` with CUDA (CPU objects over gloo, GPU tensors over NCCL), else ``"gloo"``."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(
    env: DistEnv | None = None,
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
) -> DistEnv:
    """Create the default process group and return where this rank sits.

    ``env`` defaults to :func:`dist_env_from_environ` of ``os.environ``. ``backend`` defaults to
    :func:`default_backend`. ``timeout_s`` bounds each collective; ``rendezvous_timeout_s`` bounds
    the start-up wait for the other ranks (the TCP store's own timeout). On CUDA the device is set
    from ``local_rank`` first; on CPU the megatron compatibility layer is applied (see
    ``parallel/cpu_compat.py``).
    """
    import torch.distributed as dist

    if env is None:
        env = dist_env_from_environ(os.environ)
    if dist.is_initialized():
        raise RuntimeError("init_distributed: the default process group already exists (call shutdown() first)")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = default_backend(cuda)
    if not timeout_s > 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0 (parallel.collective_timeout_s), got {timeout_s}")
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local_rank={env.local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        torch.cuda.set_device(env.local_rank)
    else:
        from dapo_megatron.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    try:
        return _rendezvous(env, backend, timedelta(seconds=timeout_s), timedelta(seconds=rendezvous_timeout_s))
    except dist.DistError as e:  # DistNetworkError (port taken), DistStoreError (rank 0 unreachable)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RendezvousError(
            f"rendezvous failed at MASTER_ADDR={env.master_addr} MASTER_PORT={env.master_port} "
            f"(rank {env.rank} of {env.world_size}): {first_line}. Set MASTER_PORT to a port that is free on "
            "MASTER_ADDR (the same on every rank), or leave it unset for a single process (any free port)"
        ) from e


def _rendezvous(env: DistEnv, backend: str, timeout: timedelta, rendezvous_timeout: timedelta) -> DistEnv:
    """The default process group; returns ``env`` with the port actually used.

    The TCP store is made here (not by an ``init_method`` URL) so that its timeout is the
    rendezvous one while the group's is the collective one. Port 0 (a lone process) binds in the
    store itself: the kernel picks a free port with no window for another process to take it.
    """
    import torch.distributed as dist

    lone = env.master_port == ANY_FREE_PORT
    store = dist.TCPStore(
        env.master_addr,
        0 if lone else env.master_port,
        env.world_size,
        env.rank == 0,
        timeout=rendezvous_timeout,
        wait_for_workers=False,  # ranks meet in init_process_group's first use of the store
        # One server per port per process, as torch's env:// rendezvous does: megatron's groups keep
        # the first store alive after shutdown(), and a second init in the same process on the same
        # MASTER_PORT (the demo: warm-up, then DAPO) must reuse it, not fail to bind.
        multi_tenant=True,
    )
    # Gloo connects its full mesh at creation under the group's timeout: create it under the
    # rendezvous timeout (ranks may still be starting), then lower it to the collective one.
    start = max(timeout, rendezvous_timeout)
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=start)
    if timeout < start:
        dist.distributed_c10d._set_pg_timeout(timeout)
    return replace(env, master_port=store.port) if lone else env


def rendezvous_store():
    """The default group's store (rank 0's TCP store, reached by every rank).

    Used for waits that must not be collectives (``parallel/rank0_wait.py``). torch keeps it in the
    group map; ``_get_default_store`` is how ``torch.distributed`` itself reads it back.
    """
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def init_model_parallel(topology: Topology, *, seed: int, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Build megatron's TP/PP/CP/EP/ETP/DP groups for ``topology`` and seed the model-parallel RNGs.

    Needs :func:`init_distributed` first; the process group's size must equal
    ``topology.world_size``. ``timeout_s`` bounds each collective of the new groups (megatron takes
    minutes; a fraction is exact, as it becomes a ``timedelta``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("init_model_parallel: call init_distributed() first")
    if dist.get_world_size() != topology.world_size:
        raise ValueError(
            f"topology world_size={topology.world_size} but the process group has {dist.get_world_size()} ranks"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        virtual_pipeline_model_parallel_size=topology.vpp if topology.vpp > 1 else None,
        context_parallel_size=topology.cp,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.etp,
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Destroy megatron's parallel state and the default process group, and stop the helper process
    megatron's checkpoint writer started, if any (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _stop_checkpoint_manager()


def _stop_checkpoint_manager() -> None:
    """dist_checkpointing's ``torch_dist`` writer keeps a ``multiprocessing`` Manager process for its
    results queue (a module global in megatron-core 0.16). Stopped here, it cannot outlive its trainer
    when the trainer's exit skips the interpreter's finalizers (a daemonic test rank, ``os._exit``)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        filesystem_async._results_queue = None
        manager.shutdown()

"""Atomic, reshardable checkpoints of a :class:`MegatronActor` with megatron-core dist_checkpointing.

Layout of one checkpoint folder ``path``::

    path/                 dist_checkpointing (torch_dist) files: model weights + optimizer state
    path/meta.pt          rank 0: step, extra_state, scheduler state, layout, optimizer_saved
    path/rng/rank_<r>.pt  every rank: python, torch CPU, CUDA and megatron tracker RNG states
    <parent>/latest       the folder name of the newest complete checkpoint (written atomically)

Weights and optimizer state are saved as ShardedTensors with *global* keys, so a checkpoint saved
at one TP/PP(/VPP) layout loads at another (dist_checkpointing reshards). The optimizer uses
``distrib_optim_sharding_type="dp_reshardable"`` so the distributed optimizer may change DP size
too. RNG files are restored only when the world size is unchanged (otherwise they do not map to
ranks) and ``load_checkpoint`` reports whether it restored them.

Atomicity: rank 0 makes ``path.tmp-<nonce>``, every rank writes into it, a barrier, then rank 0
fsyncs everything and renames: an old ``path`` is first renamed aside (``path.old-<nonce>``), the
tmp folder takes its name, and only then the old one is deleted and ``latest`` rewritten. A crash
at any point leaves either the old or the new complete checkpoint under ``path`` (or under
``path.old-*`` in the instant between the two renames, which :func:`latest_checkpoint` also finds)
and never a half-written ``path``.

Known limit (platform-notes): megatron's optimizer has no state before its first update, so a
checkpoint taken before any update stores no optimizer state (``optimizer_saved=False``) and the
loaded optimizer starts fresh, exactly like the saved one would have.
"""

from __future__ import annotations

import os
import pickle
import random
import secrets
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

LATEST = "latest"
_META = "meta.pt"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (data first, then the directory entries)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(target: str, data: bytes) -> None:
    """Write ``data`` to ``target`` via a fsynced temporary file and ``os.replace``."""
    tmp = f"{target}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(os.path.dirname(os.path.abspath(target)))


def _optimizer_has_state(actor: Any) -> bool:
    """True once an update was applied (megatron's optimizer creates its state on the first step)."""
    return actor.updates_applied > 0


def _sharded_state(actor: Any, *, is_loading: bool, with_optimizer: bool) -> Dict[str, Any]:
    """``{"model<i>": chunk i's sharded state dict, "optimizer": ...}`` of this rank."""
    state: Dict[str, Any] = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(actor.model_chunks)}
    if with_optimizer:
        model_sd = dict(state)
        state["optimizer"] = actor.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(_OPTIM_METADATA)
        )
    return state


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(actor: Any) -> Dict[str, int]:
    t = actor.topology
    return {"world_size": t.world_size, "tp": t.tp, "pp": t.pp, "vpp": t.vpp, "dp": t.dp}


def _write_into(actor: Any, tmp: str, *, step: int, extra_state: dict) -> None:
    """Every rank: sharded state (collective) and its RNG file; rank 0: ``meta.pt``."""
    from megatron.core import dist_checkpointing

    with_optimizer = _optimizer_has_state(actor)
    dist_checkpointing.save(_sharded_state(actor, is_loading=False, with_optimizer=with_optimizer), tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank()}.pt"))
    if _rank() == 0:
        meta = {
            "step": int(step),
            "extra_state": pickle.dumps(extra_state),
            "scheduler": actor.scheduler.state_dict(),
            "skipped_updates_total": actor.skipped_updates_total,
            "updates_applied": actor.updates_applied,
            "layout": _layout(actor),
            "optimizer_saved": with_optimizer,
        }
        torch.save(meta, os.path.join(tmp, _META))


def _publish(tmp: str, path: str, nonce: str) -> None:
    """Rank 0: fsync ``tmp``, swap it in for ``path`` (old one aside first), update ``latest``."""
    _fsync_tree(tmp)
    if os.path.exists(path):
        os.replace(path, f"{path}.old-{nonce}")
    os.replace(tmp, path)
    parent = os.path.dirname(os.path.abspath(path))
    _fsync_dir(parent)
    name = os.path.basename(os.path.abspath(path))
    _write_atomic(os.path.join(parent, LATEST), name.encode())
    # Only now is the new checkpoint complete and pointed to: drop the old copy and any leftovers of
    # earlier crashed saves of this name.
    for entry in os.listdir(parent):
        if entry.startswith((f"{name}.old-", f"{name}.tmp-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def save_checkpoint(actor: Any, path: str, *, step: int, extra_state: dict) -> None:
    """Collective: save ``actor`` (weights, optimizer, scheduler, RNG) and ``extra_state`` at ``path``.

    ``extra_state`` must be picklable (data sampler position, accumulator state, ...). ``path``'s
    parent folder must exist. All ranks must call with the same ``path``.
    """
    nonce = [secrets.token_hex(4) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(nonce, src=0)
    tmp = f"{path}.tmp-{nonce[0]}"
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    _write_into(actor, tmp, step=step, extra_state=extra_state)
    _barrier()
    if _rank() == 0:
        _publish(tmp, path, nonce[0])
    _barrier()


def load_checkpoint(actor: Any, path: str, *, model_only: bool = False) -> Tuple[int, dict]:
    """Collective: restore ``actor`` from ``path`` (any TP/PP layout). Returns ``(step, extra_state)``.

    Weights and optimizer state reshard to the current layout; the scheduler continues its count
    (the checkpoint's lr schedule wins over the config's, megatron's ``use_checkpoint`` rule); RNG
    states are restored when the world size matches the saved one (``actor.rng_restored`` says
    whether they were). ``model_only=True`` loads the weights alone -- starting a new run from
    existing weights -- and leaves optimizer, scheduler, counters and RNG as they are.
    """
    meta_path = os.path.join(path, _META)
    if not os.path.exists(meta_path):
        # A converted HF checkpoint (tools/convert_hf_to_megatron.py) holds weights only.
        if not model_only:
            raise FileNotFoundError(
                f"{meta_path} is missing: {path} is not a training checkpoint of this project; "
                "a converted HF checkpoint loads with model_only=True (model.load)"
            )
        _load_sharded(actor, path, with_optimizer=False)
        _barrier()
        return 0, {}
    meta = torch.load(meta_path, weights_only=False)
    with_optimizer = bool(meta["optimizer_saved"]) and not model_only
    _load_sharded(actor, path, with_optimizer=with_optimizer)
    if not model_only:
        _restore_training_state(actor, path, meta)
    _barrier()
    return int(meta["step"]), pickle.loads(meta["extra_state"])


def _load_sharded(actor: Any, path: str, *, with_optimizer: bool) -> None:
    from megatron.core import dist_checkpointing

    state = _sharded_state(actor, is_loading=True, with_optimizer=with_optimizer)
    with torch.no_grad():  # fp32 params are loaded in place (platform-notes)
        loaded = dist_checkpointing.load(state, path)
        for i, chunk in enumerate(actor.model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        if with_optimizer:
            actor.optimizer.load_state_dict(loaded["optimizer"])


def _restore_training_state(actor: Any, path: str, meta: Dict[str, Any]) -> None:
    """Scheduler, counters and (same world size only) RNG states."""
    # megatron's scheduler *adds* the saved step count to its own (which is 1 after build).
    actor.scheduler.num_steps = 0
    actor.scheduler.load_state_dict(meta["scheduler"])
    actor.skipped_updates_total = meta["skipped_updates_total"]
    actor.updates_applied = meta["updates_applied"]
    rng_file = os.path.join(path, "rng", f"rank_{_rank()}.pt")
    same_world = meta["layout"]["world_size"] == actor.topology.world_size
    actor.rng_restored = same_world and os.path.exists(rng_file)
    if actor.rng_restored:
        _set_rng_state(torch.load(rng_file, weights_only=False))


def latest_checkpoint(checkpoints_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``checkpoints_dir``, or None.

    Reads the ``latest`` pointer; if the pointed folder is missing (a crash between the two renames
    of :func:`save_checkpoint`), falls back to its ``.old-*`` copy.
    """
    pointer = os.path.join(checkpoints_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(checkpoints_dir, name)
    if os.path.exists(os.path.join(path, _META)):
        return path
    asides = sorted(
        (p for p in os.listdir(checkpoints_dir) if p.startswith(f"{name}.old-")),
        key=lambda p: os.path.getmtime(os.path.join(checkpoints_dir, p)),
    )
    return os.path.join(checkpoints_dir, asides[-1]) if asides else None

"""Atomic, reshardable checkpoints of a :class:`MegatronActor` with megatron-core dist_checkpointing.

Layout of one checkpoint folder ``path``::

    path/                 dist_checkpointing (torch_dist) files: model weights + optimizer state
    path/meta.json        rank 0: step, extra_state, scheduler state, layout, optimizer_saved, and
                          ``files``: every other file's size (written after all ranks finished)
    path/rng/rank_<r>.safetensors  every rank: python, numpy, torch CPU, CUDA, megatron tracker RNG
    <parent>/latest       the folder name of the newest complete checkpoint (written atomically)

Data only: nothing of ours is pickled (``ckpt_data``: JSON and safetensors), and before megatron
reads a folder :func:`verify_checkpoint` checks the recorded file set and sizes, scans torch's
pickled ``.metadata`` against an allowlist and loads ``common.pt`` weights-only (``ckpt_files``).
A checkpoint of the older pickle format (``meta.pt``) is refused with a :class:`CheckpointError`
saying how to use its weights.

Weights and optimizer state are saved as ShardedTensors with *global* keys, so a checkpoint saved
at one TP/PP(/VPP) layout loads at another (dist_checkpointing reshards). The distributed
optimizer's state is saved ``fully_reshardable`` (megatron-core's model-space format: per parameter
``param``/``exp_avg``/``exp_avg_sq`` tensors shaped like the parameter), so a run resumes with its
optimizer at another TP, PP or DP; ``meta.json`` records the format as ``optimizer_format``.
Checkpoints of earlier versions hold ``dp_reshardable`` state, which loads only at the layout it was
saved at (other TP/PP/VPP: a :class:`CheckpointError` that says so). RNG files are restored only
when the world size is unchanged (otherwise they do not map to ranks) and ``load_checkpoint``
reports whether it restored them.

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

import json
import os
import random
import secrets
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dapo_megatron.megatron.ckpt_data import from_json, read_rng_file, to_json, write_rng_file
from dapo_megatron.megatron.ckpt_files import (
    LEGACY_META,
    META,
    META_FORMAT,
    CheckpointError,
    file_sizes,
    read_meta,
    verify_checkpoint,
)

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "verify_checkpoint"]

LATEST = "latest"
OPTIMIZER_FORMAT = "fully_reshardable"
_OLD_OPTIMIZER_FORMAT = "dp_reshardable"  # every checkpoint without ``optimizer_format`` in meta.json


def _optim_metadata(sharding_type: str) -> Dict[str, Any]:
    """``metadata`` of megatron's ``DistributedOptimizer.sharded_state_dict`` for ``sharding_type``.

    ``fully_reshardable`` gathers each DP group's flat optimizer shards into parameter-shaped tensors
    on save. The memory-efficient variant gathers over the gloo DP group onto DP rank 0 only (the
    rank whose replica the writer keeps anyway): host memory of one model-parallel shard's state on
    that rank (12 bytes per parameter of the shard), none on the other DP ranks and none on the GPU.
    Loading reads the shard's whole state on every rank and slices it locally (no communication).
    Ignored by the non-distributed optimizer, whose state is parameter-shaped already.
    """
    meta: Dict[str, Any] = {"distrib_optim_sharding_type": sharding_type}
    if sharding_type == "fully_reshardable":
        meta["distrib_optim_fully_reshardable_mem_efficient"] = True
    return meta


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


def _sharded_state(
    actor: Any, *, is_loading: bool, with_optimizer: bool, optimizer_format: str = OPTIMIZER_FORMAT
) -> Dict[str, Any]:
    """``{"model<i>": chunk i's sharded state dict, "optimizer": ...}`` of this rank."""
    state: Dict[str, Any] = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(actor.model_chunks)}
    if with_optimizer:
        if is_loading:
            _allocate_distributed_optimizer_state(actor.optimizer)
        model_sd = dict(state)
        state["optimizer"] = actor.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optim_metadata(optimizer_format)
        )
    return state


def _allocate_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a distributed optimizer that never stepped the state tensors loading overwrites.

    With torch's Adam (no Apex/TE FusedAdam: CPU, or a GPU image without them) megatron's
    ``DistributedOptimizer.state_dict`` reads Adam's per-parameter ``step``, which exists only after
    a first step, and ``sharded_state_dict(is_loading=True)`` calls it: a fresh actor could not load
    its optimizer. megatron's own remedy (used for its FSDP format) is one step on zero gradients;
    every value it touches -- moments, step, and the fp32 shards, which are views of the weights --
    is then replaced by the checkpoint (weights, then optimizer state, see ``_load_sharded``).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": _numpy_random().get_state() if _numpy_random() else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    if state["numpy"] is not None and _numpy_random():
        _numpy_random().set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _numpy_random() -> Any:
    """numpy's global RNG module, or None without numpy (its state is saved when it exists)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


def _rng_file(path: str, rank: int) -> str:
    return os.path.join(path, "rng", f"rank_{rank}.safetensors")


def _layout(actor: Any) -> Dict[str, int]:
    t = actor.topology
    return {"world_size": t.world_size, "tp": t.tp, "pp": t.pp, "vpp": t.vpp, "dp": t.dp}


def _write_into(actor: Any, tmp: str) -> bool:
    """Every rank: sharded state (collective) and its RNG file. Returns whether optimizer state went in."""
    from megatron.core import dist_checkpointing

    with_optimizer = _optimizer_has_state(actor)
    state = _sharded_state(actor, is_loading=False, with_optimizer=with_optimizer, optimizer_format=OPTIMIZER_FORMAT)
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    write_rng_file(_rng_file(tmp, _rank()), _rng_state())
    return with_optimizer


def _write_meta(actor: Any, tmp: str, *, step: int, extra_state: dict, with_optimizer: bool) -> None:
    """Rank 0, after every rank's files are written: ``meta.json`` with the file set and sizes.

    It is written last so that its ``files`` table lists the finished files; the folder is still
    the unpublished ``tmp``, so a crash here leaves no loadable half of a checkpoint.
    """
    meta = {
        "format": META_FORMAT,
        "step": int(step),
        "extra_state": to_json(extra_state),
        "scheduler": to_json(actor.scheduler.state_dict(), "scheduler"),
        "skipped_updates_total": int(actor.skipped_updates_total),
        "updates_applied": int(actor.updates_applied),
        "layout": _layout(actor),
        "optimizer_saved": with_optimizer,
        "optimizer_format": OPTIMIZER_FORMAT,
        "files": file_sizes(tmp),
    }
    _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1).encode())


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

    ``extra_state`` must be JSON data, tuples, :class:`~dapo_megatron.types.Sample` and
    :class:`~dapo_megatron.types.Group` (``ckpt_data.to_json``; rank 0's is stored). It is encoded
    before anything is written, so a value that cannot be stored fails the save, not a later load.
    ``path``'s parent folder must exist. All ranks must call with the same ``path``.
    """
    if _rank() == 0:
        to_json(extra_state)
    nonce = [secrets.token_hex(4) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(nonce, src=0)
    tmp = f"{path}.tmp-{nonce[0]}"
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    with_optimizer = _write_into(actor, tmp)
    _barrier()  # every rank's files are complete: rank 0 can record their sizes
    if _rank() == 0:
        _write_meta(actor, tmp, step=step, extra_state=extra_state, with_optimizer=with_optimizer)
        _publish(tmp, path, nonce[0])
    _barrier()


def load_checkpoint(actor: Any, path: str, *, model_only: bool = False) -> Tuple[int, dict]:
    """Collective: restore ``actor`` from ``path`` (any TP/PP layout). Returns ``(step, extra_state)``.

    Weights and optimizer state reshard to the current layout; the scheduler continues its count
    (the checkpoint's lr schedule wins over the config's, megatron's ``use_checkpoint`` rule); RNG
    states are restored when the world size matches the saved one (``actor.rng_restored`` says
    whether they were). ``model_only=True`` loads the weights alone -- starting a new run from
    existing weights, a converted HF checkpoint or an old-format one -- and leaves optimizer,
    scheduler, counters and RNG as they are.

    The folder is verified first (:func:`verify_checkpoint`): a missing, truncated or code-carrying
    file raises :class:`CheckpointError` on every rank before megatron reads anything.
    """
    if model_only:
        verify_checkpoint(path, weights_only=True)
        _load_sharded(actor, path, with_optimizer=False)
        _barrier()
        return 0, {}
    meta = verify_checkpoint(path)
    if meta is None:
        # A converted HF checkpoint (tools/convert_hf_to_megatron.py) holds weights only.
        raise CheckpointError(
            f"{os.path.join(path, META)} is missing: {path} is not a training checkpoint of this project; "
            "a converted HF checkpoint loads with model_only=True (model.load)"
        )
    optimizer_format = _loadable_optimizer_format(actor, path, meta)
    _load_sharded(actor, path, with_optimizer=bool(meta["optimizer_saved"]), optimizer_format=optimizer_format)
    _restore_training_state(actor, path, meta)
    _barrier()
    return int(meta["step"]), from_json(meta["extra_state"])


def _loadable_optimizer_format(actor: Any, path: str, meta: Dict[str, Any]) -> str:
    """The checkpoint's optimizer format; refuses DP-only-reshardable state at another TP/PP/VPP."""
    fmt = meta.get("optimizer_format", _OLD_OPTIMIZER_FORMAT)
    if fmt not in (OPTIMIZER_FORMAT, _OLD_OPTIMIZER_FORMAT):
        raise CheckpointError(f"{os.path.join(path, META)}: unknown optimizer_format {fmt!r}")
    saved, now = meta["layout"], _layout(actor)
    model_layout = ("tp", "pp", "vpp")
    moved = [f"{k} {saved[k]} -> {now[k]}" for k in model_layout if saved.get(k) != now[k]]
    if fmt == _OLD_OPTIMIZER_FORMAT and meta["optimizer_saved"] and actor.use_distributed_optimizer and moved:
        raise CheckpointError(
            f"{path}: its distributed-optimizer state was saved {fmt!r} (an older dapo_megatron), which loads "
            f"only at the TP/PP/VPP it was saved at, but the layout changed ({', '.join(moved)}). Resume at the "
            "saved parallel.tensor/pipeline/virtual_pipeline, save again (new checkpoints reshard), then change it"
        )
    return fmt


def _load_sharded(actor: Any, path: str, *, with_optimizer: bool, optimizer_format: str = OPTIMIZER_FORMAT) -> None:
    from megatron.core import dist_checkpointing

    state = _sharded_state(actor, is_loading=True, with_optimizer=with_optimizer, optimizer_format=optimizer_format)
    with torch.no_grad():  # fp32 params are loaded in place (platform-notes)
        loaded = dist_checkpointing.load(state, path)
        for i, chunk in enumerate(actor.model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        if with_optimizer:
            _load_optimizer_state(actor.optimizer, loaded["optimizer"])


def _load_optimizer_state(optimizer: Any, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron-core 0.16's ``fully_reshardable``
    load with torch's Adam (no Apex/TE FusedAdam).

    megatron first writes the saved Adam ``step`` into every parameter's state, then copies the
    parameter-shaped tensors with a loop over *that state's* keys, while the checkpoint holds no
    per-parameter ``step`` (it lives in the param groups): ``KeyError: 'step'``. So the common part
    is loaded first, ``step`` is set aside while megatron copies ``param``/``exp_avg``/``exp_avg_sq``,
    and put back as one tensor per parameter: megatron's load hands every parameter the same tensor,
    and torch's Adam increments ``step`` in place once per parameter, so a shared one would count
    every update N times and skew Adam's bias correction after a resume (both formats).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(opts) != 1 or not isinstance(opts[0], DistributedOptimizer):
        optimizer.load_state_dict(state)
        return
    opt = opts[0]
    if state.get("param_state_sharding_type") != "fully_reshardable":
        opt.load_state_dict(state)
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    else:
        opt.load_state_dict({k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")})
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(state["param_state"])
    for p, step in steps.items():
        opt.optimizer.state[p]["step"] = step.clone()


def _restore_training_state(actor: Any, path: str, meta: Dict[str, Any]) -> None:
    """Scheduler, counters and (same world size only) RNG states."""
    # megatron's scheduler *adds* the saved step count to its own (which is 1 after build).
    actor.scheduler.num_steps = 0
    actor.scheduler.load_state_dict(meta["scheduler"])
    actor.skipped_updates_total = meta["skipped_updates_total"]
    actor.updates_applied = meta["updates_applied"]
    rng_file = _rng_file(path, _rank())
    same_world = meta["layout"]["world_size"] == actor.topology.world_size
    actor.rng_restored = same_world and os.path.exists(rng_file)
    if actor.rng_restored:
        _set_rng_state(read_rng_file(rng_file))


def latest_checkpoint(checkpoints_dir: str, *, report: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """Path of the newest intact checkpoint in ``checkpoints_dir``, or None when it holds none.

    Candidates, in order: the folder the ``latest`` pointer names; its ``.old-*`` copy (a crash
    between the two renames of :func:`save_checkpoint` leaves only that); then every other
    published folder with a ``meta.json``, newest recorded step first. The first that passes
    :func:`verify_checkpoint` wins; each one skipped is passed to ``report`` with the reason.
    Raises :class:`CheckpointError` when candidates exist but none is intact: starting over
    silently would discard the run's progress.
    """
    skipped: List[str] = []
    for path in _candidates(checkpoints_dir):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            skipped.append(f"skipping checkpoint {path}: {e}")
            if report is not None:
                report(skipped[-1])
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {checkpoints_dir}: " + "; ".join(skipped)
                              + ". Move the broken folders away to start over, or restore them")  # fmt: skip
    return None


def _candidates(checkpoints_dir: str) -> List[str]:
    """Checkpoint folders of ``checkpoints_dir`` in the order :func:`latest_checkpoint` tries them."""
    if not os.path.isdir(checkpoints_dir):
        return []
    pointer = os.path.join(checkpoints_dir, LATEST)
    name = ""
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
    entries = [e for e in os.listdir(checkpoints_dir) if ".tmp-" not in e]  # unpublished saves never count
    first = [name] if name in entries else []
    first += sorted((e for e in entries if name and e.startswith(f"{name}.old-")),
                    key=lambda e: os.path.getmtime(os.path.join(checkpoints_dir, e)), reverse=True)  # fmt: skip
    rest = [e for e in entries if e not in first and _is_checkpoint(os.path.join(checkpoints_dir, e))]
    rest.sort(key=lambda e: _recorded_step(os.path.join(checkpoints_dir, e)), reverse=True)
    return [os.path.join(checkpoints_dir, e) for e in first + rest]


def _is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in (META, LEGACY_META))


def _recorded_step(path: str) -> int:
    """The step in ``path``'s meta.json; -1 when unreadable (tried last, and its check says why)."""
    try:
        meta = read_meta(path)
        return int(meta["step"]) if meta else -1
    except (CheckpointError, KeyError, TypeError, ValueError):
        return -1

"""Step 7 of the loop: the trainer's weights, resharded to HF layout, into every rollout engine.

Every trainer rank runs :func:`push_weights` (the gathers are collective). Two paths:

* **per stage** (SGLang servers, with a :class:`~dapo_megatron.controller.stage_link.StageLink`): rank 0
  pauses and flushes the servers once and opens their update session; every pipeline stage's leader
  gathers its own TP shards and streams its own layers to the servers at the same time as the other
  stages (colocated servers on several nodes: one rank on each server's node holding every layer, see
  :mod:`~dapo_megatron.controller.node_senders`); every rank then reports what it sent (a small
  all-gather, the "done" barrier) and only then rank 0 closes the session, stamps the version once
  and continues the servers. On the leaders' path no tensor crosses between stages, and no stage
  waits for another.
* **gather to rank 0** (in-process engines, which live in rank 0's process, or no link): rank 0
  receives the whole model one tensor at a time and hands it to the engines one bucket at a time.

Peak extra memory on a sender: one bucket, not the model.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch.distributed as dist

from dapo_megatron.weights.node_gather import iter_node_buckets
from dapo_megatron.weights.reshard import bucketize, iter_hf_weights
from dapo_megatron.weights.stage_gather import iter_stage_hf_weights

DEFAULT_BUCKET_BYTES = 256 << 20


def push_weights(
    actor: Any,
    engines: Sequence[Any],
    *,
    version: int,
    run: Callable,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    link: Optional[Any] = None,
) -> Dict[str, float]:
    """Collective: load the actor's current weights into ``engines`` and stamp ``version``.

    With an enabled ``link`` (the same on every rank) the per-stage path runs (:func:`push_per_stage`);
    otherwise the gather to rank 0 below.

    ``engines`` is used on rank 0 only (other ranks pass ``[]``); ``run`` executes an engine
    coroutine on the loop the engines live on. Engines with an update session (SGLang:
    ``begin_weight_sync``/``load_bucket``/``finish_weight_sync``) are paused once for the whole sync and
    stamped only after the last bucket; the others take each bucket through ``update_weights``.
    Returns ``sync/bytes`` and ``sync/gb_per_s`` (rank 0).
    """
    if link is not None and link.enabled:
        return push_per_stage(actor, engines, version=version, run=run, bucket_bytes=bucket_bytes, link=link)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    sessions = [e for e in engines if hasattr(e, "begin_weight_sync")]
    start, nbytes, ok = time.perf_counter(), 0, False
    for engine in sessions:
        run(engine.begin_weight_sync())
    try:
        for bucket in bucketize(iter_hf_weights(actor.model_chunks, actor.spec, actor.topology), bucket_bytes):
            if not rank0:
                continue
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            for engine in engines:
                run(
                    engine.load_bucket(bucket, version)
                    if engine in sessions
                    else engine.update_weights(bucket, version)
                )
        ok = True
    finally:
        for engine in sessions:
            run(engine.finish_weight_sync(version, ok=ok))
    elapsed = time.perf_counter() - start
    return {"sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / elapsed / 1e9 if elapsed > 0 else 0.0}


def push_per_stage(
    actor: Any, engines: Sequence[Any], *, version: int, run: Optional[Callable], bucket_bytes: int, link: Any
) -> Dict[str, float]:
    """Collective: the per-stage sync (module docstring). ``engines``/``run``: rank 0's session engines
    and its event-loop runner (``[]``/None elsewhere); ``link``: this rank's
    :class:`~dapo_megatron.controller.stage_link.StageLink`.

    Returns on every rank ``sync/bytes`` (all stages), ``sync/bytes_stage<s>`` (what stage ``s``'s
    senders sent), ``sync/seconds_stage<s>`` (its slowest sender's gather + send time), ``sync/senders``
    and ``sync/gb_per_s`` (total bytes over the wall time from the pause to the version stamp, measured
    on rank 0). Raises on every rank, naming the stages, when a stage failed; the servers are then
    continued unstamped."""
    rank0 = dist.get_rank() == 0
    start = time.perf_counter()
    opened = _begin_on_rank0(engines, run) if rank0 else None
    opened = _share_from_rank0(opened)  # the go signal: no leader sends before the servers are paused
    if opened:
        raise RuntimeError(f"weight sync: the servers could not be paused for the update: {opened}")
    sent, error, t0 = 0, None, time.perf_counter()
    try:
        for bucket in _sender_buckets(actor, link, bucket_bytes):
            if link.engines:
                link.send_bucket(bucket)
                sent += sum(t.numel() * t.element_size() for _, t in bucket)
    except Exception as e:  # reported to every rank below, so rank 0 can continue the servers unstamped
        error = f"{type(e).__name__}: {e}"
    report = (link.role.stage, bool(link.engines), sent, time.perf_counter() - t0, error)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)  # every stage done (or failed) before the stamp
    failed = sorted({f"stage {s}: {err}" for s, _, _, _, err in reports if err})
    if rank0:
        for engine in engines:
            run(engine.finish_weight_sync(version, ok=not failed))
    if failed:
        raise RuntimeError("weight sync failed on " + "; ".join(failed))
    return _sync_metrics(reports, time.perf_counter() - start)


def _sender_buckets(actor: Any, link: Any, bucket_bytes: int) -> Any:
    """This rank's buckets: its stage's (stage leaders) or the whole model's (per-node senders)."""
    if link.node is not None:
        return iter_node_buckets(actor.model_chunks, actor.spec, actor.topology, link.node, bucket_bytes)
    return bucketize(iter_stage_hf_weights(actor.model_chunks, actor.spec, actor.topology), bucket_bytes)


def _sync_metrics(reports: Sequence[Any], elapsed: float) -> Dict[str, float]:
    """Per stage, the bytes its senders sent (summed: EP leaders send disjoint experts, per-node senders
    one copy per node) and the slowest sender's seconds; in all, the bytes, senders and GB/s."""
    out: Dict[str, float] = {}
    senders = 0
    for stage, sender, nbytes, seconds, _ in reports:
        if sender:
            senders += 1
            key = f"sync/bytes_stage{stage}"
            out[key] = out.get(key, 0.0) + float(nbytes)
            key = f"sync/seconds_stage{stage}"
            out[key] = max(out.get(key, 0.0), float(seconds))
    total = sum(v for k, v in out.items() if k.startswith("sync/bytes_stage"))
    out.update({"sync/bytes": total, "sync/senders": float(senders),
                "sync/gb_per_s": total / elapsed / 1e9 if elapsed > 0 else 0.0})  # fmt: skip
    return out


def _begin_on_rank0(engines: Sequence[Any], run: Callable) -> Optional[str]:
    """Pause, flush and open the update session on every engine; the error text, or None. An engine
    whose begin failed was continued by it; the ones opened before it are closed here, unstamped."""
    opened = []
    try:
        for engine in engines:
            run(engine.begin_weight_sync())
            opened.append(engine)
    except Exception as e:
        for engine in opened:
            run(engine.finish_weight_sync(0, ok=False))
        return f"{type(e).__name__}: {e}"
    return None


def _share_from_rank0(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

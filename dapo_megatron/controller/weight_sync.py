"""Step 7 of the loop: the trainer's weights, resharded to HF layout, into every rollout engine.

Every trainer rank runs :func:`push_weights` (the gather across TP/PP is collective); only global
rank 0 holds the full tensors and hands them to the engines, one bucket at a time, so the peak
extra memory on rank 0 is one bucket, not the model.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Sequence

import torch.distributed as dist

from dapo_megatron.weights.reshard import bucketize, iter_hf_weights

DEFAULT_BUCKET_BYTES = 256 << 20


def push_weights(
    actor: Any,
    engines: Sequence[Any],
    *,
    version: int,
    run: Callable,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Dict[str, float]:
    """Collective: load the actor's current weights into ``engines`` and stamp ``version``.

    ``engines`` is used on rank 0 only (other ranks pass ``[]``); ``run`` executes an engine
    coroutine on the loop the engines live on. Engines with an update session (SGLang:
    ``begin_weight_sync``/``load_bucket``/``finish_weight_sync``) are paused once for the whole sync and
    stamped only after the last bucket; the others take each bucket through ``update_weights``.
    Returns ``sync/bytes`` and ``sync/gb_per_s`` (rank 0).
    """
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

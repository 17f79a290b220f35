"""Rank functions of the optimizer-reshard test (run by tests.distributed_harness).

A run with the distributed optimizer at TP2PP2 (4 ranks) saves after update 1 and goes on for
updates 2 and 3 ("straight"). A second world of 2 ranks at TP1PP2 loads that checkpoint with its
optimizer state and takes updates 2 and 3 ("resumed"). The loss of update 2 depends only on the
weights; the loss of update 3 and the log-probs after it depend on update 2, i.e. on the restored
Adam moments. A third actor loads the weights alone (fresh Adam) as the negative control: its
update-3 loss must differ, or the comparison would prove nothing about the optimizer state.

Old log-probs are fixed (the initial model's plus noise, as in ``actor_cases``) so that the loss is
not the constant of an on-policy ratio of 1.
"""

from __future__ import annotations

import os

from tests import actor_cases as C

UPDATES_AFTER_SAVE = 2


def _steps(actor, batch, n: int) -> list:
    return [actor.train_step(batch, temperature=C.TEMPERATURE) for _ in range(n)]


def _topology(world: int, tp: int, pp: int):
    from dapo_megatron.parallel.topology import Topology

    return Topology(world_size=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1)


def _save_old_format(actor, path: str) -> None:
    """The same state saved as earlier versions did: distributed-optimizer state ``dp_reshardable``."""
    import dapo_megatron.megatron.checkpoint as ck

    current = ck.OPTIMIZER_FORMAT
    ck.OPTIMIZER_FORMAT = "dp_reshardable"
    try:
        ck.save_checkpoint(actor, path, step=1, extra_state={})
    finally:
        ck.OPTIMIZER_FORMAT = current


def straight_tp2pp2(rank: int, world: int, tmp: str) -> dict:
    """4 ranks, TP2PP2 + distributed optimizer: update 1, save, updates 2 and 3."""
    from dapo_megatron.megatron.checkpoint import save_checkpoint
    from dapo_megatron.megatron.ckpt_files import read_meta

    C.start()
    try:
        actor = C.make_actor(_topology(world, 2, 2), distributed_optimizer=True)
        batch = C.make_batch()
        batch = C.with_old_logprobs(batch, actor.compute_logprobs(batch, temperature=C.TEMPERATURE))
        first = actor.train_step(batch, temperature=C.TEMPERATURE)
        path = os.path.join(tmp, "distopt_tp2pp2")
        save_checkpoint(actor, path, step=1, extra_state={})
        _save_old_format(actor, os.path.join(tmp, "dp_reshardable_tp2pp2"))
        after = _steps(actor, batch, UPDATES_AFTER_SAVE)
        lp = actor.compute_logprobs(batch, temperature=C.TEMPERATURE)
        meta = read_meta(path) if rank == 0 else None
        C.teardown()
        return {"batch": batch, "first": first, "after": after, "lp": lp, "meta": meta}
    finally:
        C.finish()


def resumed_tp1pp2(rank: int, world: int, tmp: str, batch) -> dict:
    """2 ranks + distributed optimizer: the TP2PP2 checkpoint loaded with its optimizer at TP1PP2
    and at TP1PP1 x DP2 (the optimizer state then sharded over DP), updates 2 and 3 each; the same
    at TP1PP2 from the weights alone (fresh optimizer and scheduler), the control; and the
    ``dp_reshardable`` copy loaded at TP1PP2, which must be refused (the error text is returned)."""
    from dapo_megatron.megatron.checkpoint import CheckpointError, load_checkpoint

    C.start()
    try:
        path = os.path.join(tmp, "distopt_tp2pp2")
        out = {}
        actor = C.make_actor(_topology(world, 1, 2), distributed_optimizer=True)
        try:
            load_checkpoint(actor, os.path.join(tmp, "dp_reshardable_tp2pp2"))
        except CheckpointError as e:
            out["old_format_error"] = str(e)
        C.teardown()
        for name, (tp, pp), model_only in (("resumed", (1, 2), False), ("resumed_dp2", (1, 1), False),
                                           ("weights_only", (1, 2), True)):  # fmt: skip
            actor = C.make_actor(_topology(world, tp, pp), distributed_optimizer=True)
            load_checkpoint(actor, path, model_only=model_only)
            out[name] = {"after": _steps(actor, batch, UPDATES_AFTER_SAVE),
                         "lp": actor.compute_logprobs(batch, temperature=C.TEMPERATURE)}  # fmt: skip
            C.teardown()
        return out
    finally:
        C.finish()

"""Rank function of the padding test: one real actor update with and without column padding.

FP8 (and sequence parallelism) make the actor pad every micro-batch's columns to a multiple
(``MegatronActor.seq_multiple``, from ``token_padding.sequence_multiple``). Neither runs on CPU, so
the test sets the multiple the FP8 path would use (16) -- and 7, which pads every micro-batch of the
test batch -- on a CPU actor and runs the same ``compute_logprobs`` + ``train_step`` code.
"""

from __future__ import annotations

import torch

from tests import actor_cases as C

MULTIPLES = (1, 16, 7)


def padded_updates(rank: int, world: int, tp: int, pp: int) -> dict:
    """For each multiple: a fresh seeded actor, log-probs, one update (fixed old log-probs), weights.

    Returns ``{multiple: {"lp", "metrics", "lp_after"}}`` and the batch.
    """
    from dapo_megatron.parallel.topology import Topology

    C.start()
    try:
        topo = Topology(world_size=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1)
        out: dict = {"batch": C.make_batch()}
        for multiple in MULTIPLES:
            torch.manual_seed(C.SEED)  # the same initial weights for every multiple
            actor = C.make_actor(topo)
            actor.seq_multiple = multiple
            lp = actor.compute_logprobs(out["batch"], temperature=C.TEMPERATURE)
            if "old" not in out:
                out["old"] = C.with_old_logprobs(out["batch"], lp)
            metrics = actor.train_step(out["old"], temperature=C.TEMPERATURE)
            out[multiple] = {"lp": lp, "metrics": metrics,
                             "lp_after": actor.compute_logprobs(out["batch"], temperature=C.TEMPERATURE)}  # fmt: skip
            C.teardown()
        return out
    finally:
        C.finish()


def fp8_vs_bf16(rank: int, world: int, tmp: str) -> dict:
    """One GPU with TE layers: the same seeded weights and batch, one update in bf16 and in FP8 (e4m3)."""
    import os
    from dataclasses import replace

    from dapo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from dapo_megatron.parallel.topology import Topology

    C.start()
    try:
        topo = Topology(world_size=world)
        base = {"params_dtype": "bfloat16", "transformer_impl": "transformer_engine"}
        out: dict = {"batch": C.make_batch()}
        for fp8 in (None, "e4m3"):
            model = replace(C.sub_configs()[0], fp8=fp8, **base)
            actor = _te_actor(topo, model)
            path = os.path.join(tmp, "init")
            if fp8 is None:
                save_checkpoint(actor, path, step=0, extra_state={})
                out["old"] = C.with_old_logprobs(out["batch"], actor.compute_logprobs(out["batch"], temperature=1.0))
            else:
                load_checkpoint(actor, path, model_only=True)
            metrics = actor.train_step(out["old"], temperature=1.0)
            out[fp8] = {"multiple": actor.seq_multiple, "metrics": metrics,
                        "lp": actor.compute_logprobs(out["batch"], temperature=1.0)}  # fmt: skip
            C.teardown()
        return out
    finally:
        C.finish()


def _te_actor(topo, model_cfg):
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_model_parallel

    init_model_parallel(topo, seed=C.SEED)
    _, optim, train, algo = C.sub_configs()
    kw = dict(optim_cfg=optim, train_cfg=train, algo_cfg=algo, max_response_len=24, total_steps=4)
    return MegatronActor(
        model_spec_from_hf(C.TINY_HF), topo, model_cfg=model_cfg, prompts_per_step=4, group_size=2, **kw
    )

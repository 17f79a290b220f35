"""Rank function of the actor-level off-policy IS tests (``tests/test_actor_offpolicy.py``).

One DP2 world (TP1 PP1, two gloo processes) trains the seeded tiny model of ``actor_cases`` one
step per case, each from the same initial weights, on ``actor_cases.make_batch`` with old log-probs
away from the current ones. Each case sets ``algo.tis`` and the batch's behaviour log-probs:

- ``off``: no IS; ``seq_ones``: sequence-level IS with ``rollout_logprobs == old_logprobs``
  (every weight exactly 1);
- ``masked``: sequence-level ``mask`` mode where row ``r`` (held by DP rank 0) has a weight e^n
  far above ``mask_high``, every other row weight 1; ``ref_masked``: no IS, row ``r``'s
  advantages zeroed (its loss, and so its gradient, is 0, with the same token denominator);
- ``trunc``: token-level ``truncate`` where row ``r``'s tokens have weight e (cut to the cap 2)
  and one token of row ``r2`` (held by DP rank 1) has weight 0.9: the peaks cross ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tests import actor_cases as C

CASES = ("off", "seq_ones", "masked", "ref_masked", "trunc")


def _rows(batch, rank: int) -> list:
    """Step-batch rows DP ``rank`` trains (the actor's own pure planner)."""
    from dapo_megatron.megatron.dispatch import plan_step

    shards = plan_step(batch, dp_size=2, prompts_per_update=4, micro_batch_size=2)
    return shards[rank].batch_rows


def _cases(batch):
    """``{name: (TISConfig, batch)}`` and the rows ``(r, r2)`` they perturb."""
    from dapo_megatron.config import TISConfig

    same = replace(batch, rollout_logprobs=batch.old_logprobs.clone())
    r, r2 = _rows(batch, 0)[0], _rows(batch, 1)[0]
    resp = batch.loss_mask != 0
    far = same.rollout_logprobs.clone()
    far[r] = torch.where(resp[r], far[r] - 1.0, far[r])  # log-ratio +1 on every token of row r
    trunc = far.clone()
    first = int(torch.nonzero(resp[r2])[0])
    trunc[r2, first] -= math.log(0.9)  # weight 0.9 on one token of row r2
    adv = batch.advantages.clone()
    adv[r] = 0.0
    cases = {
        "off": (TISConfig(), same),
        "seq_ones": (TISConfig(enable=True, level="sequence"), same),
        "masked": (TISConfig(enable=True, level="sequence", mode="mask"), replace(same, rollout_logprobs=far)),
        "ref_masked": (TISConfig(), replace(same, advantages=adv)),
        "trunc": (
            TISConfig(enable=True, level="token", mode="truncate", cap=2.0),
            replace(same, rollout_logprobs=trunc),
        ),
    }
    return cases, (r, r2)


def world2(rank: int, world: int) -> dict:
    """Per case: the step metrics and (rank 0) the updated weights; plus the batch and rows."""
    from dapo_megatron.parallel.topology import Topology

    C.start()
    try:
        topo = Topology(world_size=2, tp=1, pp=1, vpp=1, cp=1, ep=1)
        actor = C.make_actor(topo)
        batch = C.make_batch()
        batch = C.with_old_logprobs(batch, actor.compute_logprobs(batch, temperature=C.TEMPERATURE))
        out: dict = {"w_init": C.full_weights(actor)}
        C.teardown()
        cases, out["rows"] = _cases(batch)
        for name, (tis, b) in cases.items():
            actor = C.make_actor(topo)
            out[f"{name}_init_equal"] = all(torch.equal(v, out["w_init"][k]) for k, v in C.full_weights(actor).items())
            actor.algo_cfg = replace(actor.algo_cfg, tis=tis)
            out[name] = {"metrics": actor.train_step(b, temperature=C.TEMPERATURE), "w": C.full_weights(actor)}
            C.teardown()
        out["batch"] = batch
        return out
    finally:
        C.finish()

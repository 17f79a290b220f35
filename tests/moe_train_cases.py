"""Rank functions for the MoE training tests (run by tests.distributed_harness; module level, so
spawn can pickle them).

One tiny random Qwen3-MoE (tests.moe_cases, 2 layers, 4 experts, top-2) is loaded from its HF folder
through the weight mapping into every layout. Each layout takes the real ``MegatronActor.train_step``
with :class:`dapo_megatron.megatron.moe_stats.MoEStepStats` reset before and reduced after it.

- ``world1``: EP1 (1 rank) references: the DAPO step with the aux loss on, the same with a capacity
  factor, and the aux-only cases (identical rows, zero advantages) at 1 and 4 micro-batches;
- ``world2``: DP2 x EP1, DP2 x EP2 and PP2 (the stats summed over stages) on the same batch, the
  capacity run at EP2, and the aux-only case at DP2 x EP2.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

import torch
from moe_cases import init_layout, load_hf_into

from dapo_megatron.megatron.moe_stats import KEYS as MOE_KEYS  # noqa: F401  (for the tests; torch-only module)

SEED = 1234
TEMPERATURE = 1.0
AUX_COEFF = 0.01
CAPACITY = 1.0
VOCAB = 250


def make_moe_actor(hf_dir: str, world: int, ep: int, *, pp: int = 1, coeff: float = AUX_COEFF,
                   capacity: Optional[float] = None, micro_batch_size: int = 1):  # fmt: skip
    """Parallel state for (TP1, PP ``pp``, EP ``ep``) on ``world`` ranks, an actor on it, weights from ``hf_dir``.

    The optimizer makes one update ~``lr * g`` (as in tests.actor_cases.sub_configs), so the updated
    weights show the gradient's scale.
    """
    from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf

    topology = init_layout(world, pp=pp, ep=ep)
    spec = model_spec_from_hf(hf_dir)
    actor = MegatronActor(
        spec, topology,
        model_cfg=ModelConfig(params_dtype="float32", transformer_impl="local", seed=SEED,
                              moe_aux_loss_coeff=coeff, moe_capacity_factor=capacity),
        optim_cfg=OptimConfig(lr=1.0, lr_warmup_steps=0, weight_decay=0.0, adam_eps=1.0, clip_grad=0.0),
        train_cfg=TrainConfig(ppo_mini_batch_size=4, micro_batch_size=micro_batch_size),
        algo_cfg=AlgoConfig(loss_agg_mode="token-mean"),
        max_response_len=24, total_steps=4, prompts_per_step=4, group_size=2,
    )  # fmt: skip
    load_hf_into(actor.model_chunks, spec, hf_dir)
    return actor, spec, topology


def step_with_stats(actor, batch) -> dict:
    """``train_step`` with the MoE statistics around it, as the actor will run them."""
    from dapo_megatron.megatron.moe_stats import MoEStepStats

    stats = MoEStepStats(actor.model_chunks)
    stats.reset()
    metrics = actor.train_step(batch, temperature=TEMPERATURE)
    metrics.update(stats.reduce())
    stats.close()
    return {"metrics": metrics, "last": {k: v.clone() for k, v in stats.last.items()}}


def hf_weights(actor, spec, topology) -> Optional[Dict[str, torch.Tensor]]:
    """The full HF state dict on rank 0 (None elsewhere); collective."""
    import torch.distributed as dist

    from dapo_megatron.weights.reshard import iter_hf_weights

    out = dict(iter_hf_weights(actor.model_chunks, spec, topology))  # names only off rank 0
    return {n: t.clone() for n, t in out.items()} if dist.get_rank() == 0 else None


def make_batch(seed: int = 7):
    """tests.actor_cases' fixed batch (4 groups x 2 responses) on this model's vocabulary."""
    from actor_cases import make_batch as dense_batch

    return dense_batch(seed=seed, vocab=VOCAB)


def identical_rows(batch):
    """8 copies of row 0 with zero advantages and no old log-probs (recomputed): the policy loss has
    zero gradient, so the update's gradient is the aux loss's alone, and every micro-batch, however
    the rows are split, has the same aux loss."""
    n = batch.tokens.shape[0]

    def rep(x):
        return x[:1].expand(n, -1).clone()

    return replace(batch, tokens=rep(batch.tokens), loss_mask=rep(batch.loss_mask),
                   advantages=torch.zeros_like(batch.advantages), rollout_logprobs=rep(batch.rollout_logprobs),
                   old_logprobs=None)  # fmt: skip


def _teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _layout(hf_dir: str, world: int, ep: int, batch, **kw) -> dict:
    """One train step at this layout: metrics, stats, and the updated weights (rank 0)."""
    actor, spec, topology = make_moe_actor(hf_dir, world, ep, **kw)
    res = step_with_stats(actor, batch)
    res["w_after"] = hf_weights(actor, spec, topology)
    _teardown()
    return res


def _aux_only(hf_dir: str, world: int, ep: int, batch) -> dict:
    """Identical rows, zero advantages: grad norm and stats at several micro-batch counts / coeffs."""
    rows = identical_rows(batch)
    out = {}
    for name, mbs, coeff in (("m1", 8, AUX_COEFF), ("m4", 2, AUX_COEFF), ("m4_2x", 2, 2 * AUX_COEFF), ("off", 2, 0.0)):
        if world > 1 and name != "m4":
            continue
        actor, _, _ = make_moe_actor(hf_dir, world, ep, coeff=coeff, micro_batch_size=mbs)
        out[name] = step_with_stats(actor, rows)
        _teardown()
    return out


def world1(rank: int, world: int, hf_dir: str) -> dict:
    """EP1 references: log-probs, the batch with old log-probs, the step with and without a capacity
    factor (and updated weights), the aux-only cases."""
    from actor_cases import with_old_logprobs

    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    try:
        actor, spec, topology = make_moe_actor(hf_dir, world, 1)
        out: dict = {"w_init": hf_weights(actor, spec, topology)}
        batch = make_batch()
        out["lp_init"] = actor.compute_logprobs(batch, temperature=TEMPERATURE)
        _teardown()
        batch = with_old_logprobs(batch, out["lp_init"])
        out["batch"] = batch
        out["ep1"] = _layout(hf_dir, world, 1, batch)
        out["ep1_cap"] = _layout(hf_dir, world, 1, batch, capacity=CAPACITY)
        out["aux_only"] = _aux_only(hf_dir, world, 1, batch)
        return out
    finally:
        shutdown()


def world2(rank: int, world: int, hf_dir: str, batch) -> dict:
    """DP2 x EP1, DP2 x EP2 and PP2 on the reference batch, EP2 with the capacity factor, the aux-only case."""
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    try:
        out = {
            "dp2": _layout(hf_dir, world, 1, batch),
            "ep2": _layout(hf_dir, world, 2, batch),
            "pp2": _layout(hf_dir, world, 1, batch, pp=2),
            "ep2_cap": _layout(hf_dir, world, 2, batch, capacity=CAPACITY),
            "aux_only": _aux_only(hf_dir, world, 2, batch),
        }
        return out
    finally:
        shutdown()


# ----------------------------------------------------------------------------- expectations from HF
def hf_router_counts(hf_dir: str, rows: torch.Tensor, lengths: list, capacity: Optional[float] = None) -> dict:
    """What megatron's routers should see, from transformers' fp32 router logits: each row is its own
    micro-batch trimmed to ``lengths[i]`` tokens (micro_batch_size 1).

    Returns ``counts`` [L, E] (top-k assignments, before dropping), ``aux`` [rows, L] (the switch
    loss ``E * sum_e f_e P_e`` of each row and layer) and ``dropped`` [rows, L] (assignments over
    capacity ``ceil(t * k / E * capacity)``; zeros without a capacity; meaningful for layer 0 only,
    as dropping changes the next layer's input).
    """
    import math

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    k, E = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, E, dtype=torch.float64)
    aux, dropped = [], []
    with torch.no_grad():
        for row, t in zip(rows, lengths):
            logits = model(row[None, :t], output_router_logits=True).router_logits
            a, d = [], []
            for layer, lg in enumerate(logits):
                probs = torch.softmax(lg.double(), dim=-1)
                chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0)
                per_expert = chosen.sum(0)
                counts[layer] += per_expert
                a.append(float(E * (per_expert / (t * k) * probs.mean(0)).sum()))
                cap = math.ceil(t * k / E * capacity) if capacity else None
                d.append(float((per_expert - cap).clamp_min(0).sum()) if cap is not None and cap <= t else 0.0)
            aux.append(a)
            dropped.append(d)
    return {"counts": counts, "aux": torch.tensor(aux), "dropped": torch.tensor(dropped)}

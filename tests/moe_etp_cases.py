"""Rank functions for the expert-tensor-parallel (ETP) tests (module level, so spawn can pickle them).

Every ``*_case(rank, world_size, ...)`` runs inside :func:`tests.distributed_harness.run_distributed`.
Layouts are ``(tp, pp, ep, etp)``. Each data-parallel rank forwards its own rows of the token batch,
cut to its own length (rank ``r`` of ``dp`` takes rows ``r::dp`` and the first ``s - r``
positions): at TP=1 and ETP=2 the two ranks of an expert-TP group hold different numbers of
different tokens, which megatron's dispatcher gathers before the split expert MLPs and scatters
back after, so equal inputs on every rank would hide a token sent to the wrong rank and equal
counts would hide the uneven collectives (``dapo_megatron.megatron.moe_gloo``).
"""

from __future__ import annotations

import torch
from moe_cases import build, load_hf_into
from weights_cases import as_bytes, forward_logits


def init_etp_layout(world_size: int, tp: int, pp: int, ep: int, etp: int):
    from dapo_megatron.parallel.init import init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    topology = Topology(world_size, tp=tp, pp=pp, ep=ep, etp=etp)
    init_model_parallel(topology, seed=1234)
    return topology


def etp_layouts_case(rank: int, world_size: int, hf_dir: str, layouts: list, tokens: torch.Tensor) -> bytes:
    """Per layout: this rank's rows and length of ``tokens`` and their logits (training mode, loaded from
    ``hf_dir`` by the mapping), the rank-0 gather (``iter_hf_weights``: a dict on rank 0, the names
    elsewhere), this rank's per-stage gather, its role and megatron's expert-TP world size."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, shutdown
    from dapo_megatron.weights.reshard import iter_hf_weights
    from dapo_megatron.weights.stage_gather import iter_stage_hf_weights, stage_role

    init_distributed()
    spec = model_spec_from_hf(hf_dir)
    results = []
    for tp, pp, ep, etp in layouts:
        topology = init_etp_layout(world_size, tp, pp, ep, etp)
        chunks = build(spec, topology, training=True)
        load_hf_into(chunks, spec, hf_dir)
        dp_rank = ps.get_data_parallel_rank()
        rows, length = torch.arange(tokens.shape[0])[dp_rank :: topology.dp], tokens.shape[1] - dp_rank
        mine = tokens[rows, :length]
        out = {"rows": rows, "length": length, "logits": forward_logits(chunks, mine, spec.vocab_size)}
        gathered = list(iter_hf_weights(chunks, spec, topology))
        out["rank0"] = dict(gathered) if rank == 0 else [n for n, _ in gathered]
        out["stage"] = dict(iter_stage_hf_weights(chunks, spec, topology))
        out["role"] = stage_role()
        out["etp"] = ps.get_expert_tensor_parallel_world_size()
        results.append(out)
        ps.destroy_model_parallel()
    shutdown()
    return as_bytes(results)


# ----------------------------------------------------------------------------- DAPO step
def _etp_actor_layouts(etp: int):
    """Make tests.moe_train_cases build its actors on ``etp``-way expert tensor parallelism (TP=1):
    its ``make_moe_actor`` looks ``init_layout`` up in its module at call time."""
    import moe_train_cases

    def init_layout(world: int, tp: int = 1, pp: int = 1, ep: int = 1):
        return init_etp_layout(world, tp, pp, ep, etp)

    moe_train_cases.init_layout = init_layout


def train_world1(rank: int, world: int, hf_dir: str) -> dict:
    """EP1 reference on one rank: initial weights, the batch with old log-probs, one DAPO step with
    the aux loss on, and the same with a capacity factor (tests.moe_train_cases' ``_layout``)."""
    import moe_train_cases as C
    from actor_cases import with_old_logprobs

    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    try:
        actor, spec, topology = C.make_moe_actor(hf_dir, world, 1)
        out: dict = {"w_init": C.hf_weights(actor, spec, topology)}
        batch = C.make_batch()
        lp = actor.compute_logprobs(batch, temperature=C.TEMPERATURE)
        C._teardown()
        out["batch"] = batch = with_old_logprobs(batch, lp)
        out["ep1"] = C._layout(hf_dir, world, 1, batch)
        out["ep1_cap"] = C._layout(hf_dir, world, 1, batch, capacity=C.CAPACITY)
        return out
    finally:
        shutdown()


def train_etp(rank: int, world: int, hf_dir: str, batch, ep: int) -> dict:
    """The same step at TP=1, ETP=2, EP ``ep`` on ``world`` ranks, with and without the capacity factor."""
    import moe_train_cases as C

    from dapo_megatron.parallel.init import init_distributed, shutdown

    _etp_actor_layouts(2)
    init_distributed()
    try:
        return {
            "etp2": C._layout(hf_dir, world, ep, batch),
            "etp2_cap": C._layout(hf_dir, world, ep, batch, capacity=C.CAPACITY),
        }
    finally:
        shutdown()


# ----------------------------------------------------------------------------- checkpoints
def etp_checkpoint_case(rank: int, world: int, hf_dir: str, ckpt: str, save_dir: str, tokens, ep: int) -> bytes:
    """At TP=1, ETP=2, EP ``ep``: load the converted ``ckpt`` strictly (megatron's sharded state
    dict cuts each expert for this expert-TP rank), take logits; perturb, take logits and the
    rank-0 HF gather, and save the model part to ``save_dir`` (tests.moe_convert_cases' steps)."""
    from moe_convert_cases import checkpoint_round

    return checkpoint_round(rank, hf_dir, ckpt, save_dir, tokens, lambda: init_etp_layout(world, 1, 1, ep, 2))


# ----------------------------------------------------------------------------- routing replay
def etp_replay_case(rank: int, world: int, hf_dir: str, tokens, ids) -> bytes:
    """TP=1, ETP=``world``: logits without and with routing replay of ``ids`` (tests.moe_cases'
    ``replay_case`` on expert-tensor-parallel experts)."""
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.megatron.moe_replay import replay_routing
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    spec = model_spec_from_hf(hf_dir)
    chunks = build(spec, init_etp_layout(world, 1, 1, 1, world))
    load_hf_into(chunks, spec, hf_dir)
    free = forward_logits(chunks, tokens, spec.vocab_size)
    with replay_routing(chunks, ids):
        replayed = forward_logits(chunks, tokens, spec.vocab_size)
    shutdown()
    return as_bytes({"free": free, "replayed": replayed})

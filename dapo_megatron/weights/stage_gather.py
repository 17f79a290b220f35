"""Per-pipeline-stage gather: each PP stage turns its own shards into full HF tensors on its leader.

The counterpart of :func:`dapo_megatron.weights.reshard.iter_hf_weights` without the rank-0 funnel.
The *stage leader* of pipeline stage ``s`` is the rank with ``pp_rank == s``, TP rank 0 and DP
(and CP) rank 0. For each megatron tensor its stage owns, in the fixed order of
:func:`dapo_megatron.weights.mapping.conversion_plan` restricted to that stage (embedding on stage 0,
final norm and output layer on the last stage, each layer on its ``layer_owner`` stage):

1. the DP-rank-0 replica of the stage all-gathers the TP shards in its TP group and reassembles the
   TP=1 tensor (``mapping.tp_gather``); the other DP replicas hold copies and do nothing;
2. the stage leader converts it to HF tensors and yields them.

Collectives stay inside one stage's TP group, so the stages run concurrently and no tensor crosses
between stages. Ranks other than a stage leader yield nothing but must still exhaust the iterator
(the TP all-gathers). Peak extra memory on a leader: one full tensor plus its HF split.

Expert parallelism (MoE): a stage has one leader per EP rank (expert-TP rank 0, expert-DP rank 0).
EP rank ``r``'s leader yields the routed experts that rank holds, gathered over its expert-TP group;
EP rank 0's leader (the dense leader above) also yields every non-expert tensor. No expert crosses
EP ranks, so the engines receive each expert once, from the rank that trains it.

Per-node senders (colocated servers on several nodes, EP=1): shared tensors do not cross nodes, so each
node's servers are fed by a rank on that node. ``replica=(gathers, emits)`` replaces the leader rule:
every rank of a DP replica that ``gathers`` takes part in its TP all-gathers (an all-gather leaves the
full tensor on each of them), and a rank that ``emits`` converts and yields it. Any DP replica can
gather, since they hold the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor

from dapo_megatron.weights import mapping
from dapo_megatron.weights.reshard import _gather_tp, _Groups, _owner_stage, layer_owner, local_params


@dataclass(frozen=True)
class StageRole:
    """This rank's place in the per-stage sync: its pipeline stage, whether it leads (sends for) the
    stage's EP rank ``ep_rank``, the number of stages (``pp``) and of EP ranks (``ep``), and its DP
    ``replica`` (DP rank with CP) and ``tp_rank`` (the per-node senders' plan reads both). With
    ``ep == 1`` a stage has exactly one leader."""

    stage: int
    leader: bool
    pp: int
    ep_rank: int = 0
    ep: int = 1
    replica: int = 0
    tp_rank: int = 0


def stage_role() -> StageRole:
    """Read from megatron's initialised parallel state."""
    g = _Groups()
    leader = g.tp_rank == 0 and g.edp_rank == 0 and g.etp_rank == 0
    return StageRole(stage=g.pp_rank, leader=leader, pp=g.pp, ep_rank=g.ep_rank, ep=g.ep, replica=g.dp_rank,
                     tp_rank=g.tp_rank)  # fmt: skip


def stage_items(spec: Any, pp: int, vpp: int, stage: int) -> List[mapping.ConvItem]:
    """The conversion items stage ``stage`` owns, in conversion-plan order (pure)."""
    owners = layer_owner(spec.num_layers, pp, vpp)
    return [item for item in mapping.conversion_plan(spec) if _owner_stage(item, owners, pp) == stage]


def iter_stage_hf_weights(
    model_chunks: Sequence[Any], spec: Any, topology: Any, *, replica: Optional[Tuple[bool, bool]] = None
) -> Iterator[Tuple[str, Tensor]]:
    """Collective within each stage's TP group: ``(hf_name, tensor)`` of this stage's tensors (full TP=1
    tensors, vocab padding stripped), on the stage leader only, or with ``replica=(gathers, emits)`` on
    the ranks that emit (module docstring; the same ``gathers`` on every rank of a TP group). Every rank
    must exhaust it."""
    g = _Groups()
    if (g.tp, g.pp) != (topology.tp, topology.pp):
        raise ValueError(f"topology tp={topology.tp} pp={topology.pp} != parallel state tp={g.tp} pp={g.pp}")
    if replica is not None and g.ep != 1:
        raise ValueError(f"per-node weight senders need expert parallelism 1, not {g.ep}")
    if not (replica[0] if replica is not None else g.edp_rank == 0):
        return  # a DP replica of this rank's weights that no one reads: another copy is sent
    moe = getattr(spec, "moe", None)
    per_rank = moe.num_experts // g.ep if moe is not None else 0
    params = local_params(model_chunks, g.ep_rank)
    index = mapping.conversion_index(spec)
    for item in stage_items(spec, topology.pp, topology.vpp, g.pp_rank):
        mine = g.dp_rank == 0 if item.expert is None else item.expert // per_rank == g.ep_rank
        if not (mine or replica is not None):
            continue
        if item.megatron_name not in params:
            raise RuntimeError(f"{item.megatron_name} is not on pp rank {g.pp_rank}, where the uniform split puts it")
        full = _gather_tp(item.megatron_name, params[item.megatron_name], g)
        emits = replica[1] if replica is not None else (g.tp_rank if item.expert is None else g.etp_rank) == 0
        if emits:
            yield from mapping.megatron_to_hf(spec, item.megatron_name, full, index=index)

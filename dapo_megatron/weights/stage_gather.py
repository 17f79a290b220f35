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
(the TP all-gathers). Peak extra memory on a leader: one full tensor plus its HF split. Not handled:
expert parallelism (dense models only, as the gather-to-rank-0 path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence, Tuple

from torch import Tensor

from dapo_megatron.weights import mapping
from dapo_megatron.weights.reshard import _gather_tp, _Groups, _owner_stage, layer_owner, local_params


@dataclass(frozen=True)
class StageRole:
    """This rank's place in the per-stage sync: its pipeline stage, whether it leads the stage, and
    the number of stages (``pp``)."""

    stage: int
    leader: bool
    pp: int


def stage_role() -> StageRole:
    """Read from megatron's initialised parallel state."""
    g = _Groups()
    return StageRole(stage=g.pp_rank, leader=g.tp_rank == 0 and g.dp_rank == 0, pp=g.pp)


def stage_items(spec: Any, pp: int, vpp: int, stage: int) -> List[mapping.ConvItem]:
    """The conversion items stage ``stage`` owns, in conversion-plan order (pure)."""
    owners = layer_owner(spec.num_layers, pp, vpp)
    return [item for item in mapping.conversion_plan(spec) if _owner_stage(item, owners, pp) == stage]


def iter_stage_hf_weights(model_chunks: Sequence[Any], spec: Any, topology: Any) -> Iterator[Tuple[str, Tensor]]:
    """Collective within each stage's TP group: ``(hf_name, tensor)`` of this stage's tensors, on the
    stage leader only (full TP=1 tensors, vocab padding stripped). Every rank must exhaust it."""
    g = _Groups()
    if (g.tp, g.pp) != (topology.tp, topology.pp):
        raise ValueError(f"topology tp={topology.tp} pp={topology.pp} != parallel state tp={g.tp} pp={g.pp}")
    if g.dp_rank != 0:
        return  # a DP replica: the DP-rank-0 copy of this stage is the one sent
    params = local_params(model_chunks)
    index = mapping.conversion_index(spec)
    for item in stage_items(spec, topology.pp, topology.vpp, g.pp_rank):
        if item.megatron_name not in params:
            raise RuntimeError(f"{item.megatron_name} is not on pp rank {g.pp_rank}, where the uniform split puts it")
        full = _gather_tp(item.megatron_name, params[item.megatron_name], g)
        if g.tp_rank == 0:
            yield from mapping.megatron_to_hf(spec, item.megatron_name, full, index=index)

"""Gather the trainer's TP/PP(/VPP)-sharded parameters into full HF-named tensors, and bucket them.

:func:`iter_hf_weights` is collective over all trainer ranks. Per megatron tensor, in the fixed
order of :func:`dapo_megatron.weights.mapping.conversion_plan` (embedding, layers 0..L-1, final
norm, output layer):

1. the pipeline stage owning it (``layer_owner``) all-gathers the TP shards inside its TP group
   and reassembles the TP=1 tensor (``mapping.tp_gather``; linear_fc1 needs the gate/up reorder);
   only data-parallel (and context-parallel) rank 0 does this, the other replicas hold copies;
2. if that stage is not stage 0, its TP-rank-0 / DP-rank-0 process sends the full tensor to global
   rank 0 (point-to-point on the default group); rank 0 allocates it from the spec's shapes;
3. rank 0 converts it to HF tensors (``mapping.megatron_to_hf``) and yields them.

Every rank yields the same sequence of HF names; only global rank 0 gets tensors, the others get
``None``. All ranks must exhaust the iterator together (it contains collectives). A routed
expert (MoE) is gathered by its own EP rank (expert-DP rank 0, over the expert-TP group) and sent
from there to rank 0. Peak extra memory on rank 0: one full tensor (plus its HF split), on an
owner stage: the TP shards of one tensor.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dapo_megatron.weights import mapping


def layer_owner(num_layers: int, pp: int, vpp: int) -> List[Tuple[int, int]]:
    """Global layer index -> ``(pp_rank, vpp_chunk)`` for megatron's uniform interleaved split.

    Each of the ``pp * vpp`` chunks holds ``num_layers / (pp * vpp)`` consecutive layers; chunk
    ``c`` of stage ``p`` starts at layer ``(c * pp + p) * per_chunk`` (megatron's layer offset).
    """
    chunks = pp * vpp
    if num_layers % chunks:
        raise ValueError(f"num_layers={num_layers} does not split into pp*vpp={chunks} equal chunks")
    per = num_layers // chunks
    return [((i // per) % pp, (i // per) // pp) for i in range(num_layers)]


def bucketize(named_tensors: Iterable[Tuple[str, Optional[Tensor]]], max_bytes: int) -> Iterator[List[Tuple[str, Any]]]:
    """Group consecutive tensors into lists of at most ``max_bytes`` (order kept).

    A tensor larger than ``max_bytes`` gets a bucket of its own. ``None`` entries (what
    :func:`iter_hf_weights` yields on ranks other than 0) count as 0 bytes, so those ranks may run
    the same loop, but their bucket boundaries differ from rank 0's.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    bucket: List[Tuple[str, Any]] = []
    size = 0
    for name, t in named_tensors:
        n = 0 if t is None else t.numel() * t.element_size()
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _unwrap(chunk: Any) -> Any:
    """DDP / Float16Module wrappers keep the GPTModel in ``.module``."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def local_params(model_chunks: Sequence[Any], ep_rank: int = 0) -> Dict[str, Tensor]:
    """Global megatron name (local-spec scheme, global layer index, global expert index) -> this
    rank's shard.

    Layer indices come from each layer's ``layer_number`` (1-based, global), so any layer offset
    logic megatron applied is respected. Expert ``j`` of EP rank ``ep_rank`` is global expert
    ``ep_rank * E/ep + j`` (megatron's contiguous expert split).
    """
    out: Dict[str, Tensor] = {}
    for chunk in model_chunks:
        model = _unwrap(chunk)
        experts = getattr(model.config, "num_moe_experts", None) or 0
        offset = ep_rank * (experts // model.config.expert_model_parallel_size)
        local_to_global = {}
        decoder = getattr(model, "decoder", None)
        for j, layer in enumerate(getattr(decoder, "layers", [])):
            local_to_global[j] = layer.layer_number - 1
        for name, p in model.named_parameters():
            if name.startswith("decoder.layers."):
                j, rest = name[len("decoder.layers.") :].split(".", 1)
                name = f"decoder.layers.{local_to_global[int(j)]}.{rest}"
            if offset and mapping.expert_of(name) is not None:
                name = mapping.renumber_expert(name, offset)
            out[mapping.normalize_megatron_name(name)] = p.detach()
    return out


class _Groups:
    """The process groups and ranks the gather needs (from megatron's parallel_state)."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        pp_ranks = ps.get_pipeline_model_parallel_group()
        import torch.distributed as dist

        self.rank = dist.get_rank()
        # Global rank of each pipeline stage in *this* rank's PP group (same TP/DP coordinates).
        self.stage_ranks = dist.get_process_group_ranks(pp_ranks)
        # Expert layout: EP rank r holds experts [r*E/ep, (r+1)*E/ep); its expert-DP rank 0 holds the
        # copy that is gathered (over the expert-TP group) and sent.
        self.ep = ps.get_expert_model_parallel_world_size()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.edp_rank = ps.get_expert_data_parallel_rank()
        self.etp = ps.get_expert_tensor_parallel_world_size()
        self.etp_rank = ps.get_expert_tensor_parallel_rank()
        self.etp_group = ps.get_expert_tensor_parallel_group()

    def expert_holders(self) -> Dict[Tuple[int, int], int]:
        """Collective: ``(pp_rank, ep_rank)`` -> the global rank that holds the gathered experts."""
        import torch.distributed as dist

        coords = [None] * dist.get_world_size()
        dist.all_gather_object(coords, (self.pp_rank, self.ep_rank, self.edp_rank, self.etp_rank))
        return {(c[0], c[1]): r for r, c in enumerate(coords) if c is not None and c[2:] == (0, 0)}


def _owner_stage(item: mapping.ConvItem, owners: List[Tuple[int, int]], pp: int) -> int:
    if item.layer is not None:
        return owners[item.layer][0]
    return 0 if item.megatron_name.startswith("embedding.") else pp - 1


def _gather_tp(name: str, shard: Tensor, g: _Groups) -> Tensor:
    """The TP=1 tensor of ``name`` from this rank's TP group (the expert-TP group for experts)."""
    import torch.distributed as dist

    expert = mapping.expert_of(name) is not None
    size, group = (g.etp, g.etp_group) if expert else (g.tp, g.tp_group)
    if size == 1 or mapping.tp_rule(name) == mapping.REPLICATED:
        return shard
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(parts, shard, group=group)
    return mapping.tp_gather(name, parts)


def _expert_on_rank0(item, owner: int, params, g: _Groups, holders, per_rank: int, shapes, dtype):
    """A routed expert's TP=1 tensor on global rank 0 (None elsewhere): its EP rank's expert-DP-rank-0
    copy is gathered over the expert-TP group, then sent by that group's rank 0 unless it is rank 0."""
    import torch.distributed as dist

    name, ep_owner = item.megatron_name, item.expert // per_rank
    full = None
    if (g.pp_rank, g.ep_rank, g.edp_rank) == (owner, ep_owner, 0):
        full = _gather_tp(name, params[name], g)
    holder = holders[(owner, ep_owner)]
    if holder == 0:
        return full if g.rank == 0 else None
    if g.rank == 0:
        buf = torch.empty(shapes[name], dtype=dtype, device=params["embedding.word_embeddings.weight"].device)
        dist.recv(buf, src=holder)
        return buf
    if g.rank == holder:
        dist.send(full.contiguous(), dst=0)
    return None


def _full_on_rank0(item, owner: int, params, g: _Groups, shapes, dtype) -> Optional[Tensor]:
    """The TP=1 tensor of ``item`` on global rank 0 (None elsewhere). Collective within the
    owner stage's TP group (DP rank 0 only) plus one send/recv between the owner and rank 0."""
    import torch.distributed as dist

    name = item.megatron_name
    full = None
    if g.dp_rank == 0 and g.pp_rank == owner:
        full = _gather_tp(name, params[name], g)
    if owner == 0:
        return full if g.rank == 0 else None
    sender = g.stage_ranks[owner] if g.tp_rank == 0 and g.dp_rank == 0 else None
    if g.rank == 0:
        buf = torch.empty(shapes[name], dtype=dtype, device=params["embedding.word_embeddings.weight"].device)
        dist.recv(buf, src=g.stage_ranks[owner])
        return buf
    if sender == g.rank:
        dist.send(full.contiguous(), dst=g.stage_ranks[0])
    return None


def iter_hf_weights(model_chunks: Sequence[Any], spec: Any, topology: Any) -> Iterator[Tuple[str, Optional[Tensor]]]:
    """Collective: yield ``(hf_name, tensor)`` for the whole model; tensors on global rank 0 only.

    ``model_chunks``: this rank's VPP chunks (GPTModel, possibly DDP-wrapped), as built by
    ``dapo_megatron.megatron.model.build_model_chunks``. ``topology`` must match the initialised
    megatron parallel state (checked). Tensors are full (TP=1) and vocab padding is stripped.
    """
    g = _Groups()
    if (g.tp, g.pp) != (topology.tp, topology.pp):
        raise ValueError(f"topology tp={topology.tp} pp={topology.pp} != parallel state tp={g.tp} pp={g.pp}")
    params = local_params(model_chunks, g.ep_rank)
    owners = layer_owner(spec.num_layers, topology.pp, topology.vpp)
    for name in params:
        if name.startswith("decoder.layers.") and owners[int(name.split(".")[2])][0] != g.pp_rank:
            raise RuntimeError(f"{name} lives on pp rank {g.pp_rank}, not where the uniform split puts it")
    shapes = dtype = None
    if g.rank == 0:
        emb = params["embedding.word_embeddings.weight"]
        shapes = mapping.megatron_shapes(spec, padded_vocab=emb.shape[0] * g.tp)
        dtype = emb.dtype
    index = mapping.conversion_index(spec)
    moe = getattr(spec, "moe", None)
    holders = g.expert_holders() if moe is not None else {}
    per_rank = moe.num_experts // g.ep if moe is not None else 0
    for item in mapping.conversion_plan(spec):
        owner = _owner_stage(item, owners, g.pp)
        if item.expert is None:
            full = _full_on_rank0(item, owner, params, g, shapes, dtype)
        else:
            full = _expert_on_rank0(item, owner, params, g, holders, per_rank, shapes, dtype)
        if g.rank == 0:
            yield from mapping.megatron_to_hf(spec, item.megatron_name, full, index=index)
        else:
            yield from ((n, None) for n in item.hf_names)

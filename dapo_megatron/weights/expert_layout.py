"""The megatron dist-checkpoint layout of a whole GPTModel, routed experts (MoE) included.

Dense tensors are laid out as :mod:`dapo_megatron.weights.dist_layout` describes (one key per kind,
the layer as a leading axis). Routed experts add a second leading axis, the *global* expert index.
Checked against megatron-core 0.16.1 ``SequentialMLP.sharded_state_dict`` (``TEGroupedMLP`` says its
keys are interchangeable with it), without ``singleton_local_shards``:

* ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight`` is the slice ``[i, e]`` of
  key ``decoder.layers.mlp.experts.experts.linear_fc2.weight``, global shape ``[L, E, h, ffn_e]``;
* ``...local_experts.{e}.linear_fc1.weight`` is two pieces (gate rows, then up rows) of key
  ``decoder.layers.mlp.experts.experts.linear_fc1.weight``, global shape ``[L, E, 2*ffn_e, h]``;
* each expert linear has an ``_extra_state`` ShardedObject of shape ``[L, E]`` (key
  ``decoder.layers.mlp.experts.experts.linear_fc{1,2}._extra_state``); a MoE layer has no dense
  ``mlp.linear_fc{1,2}._extra_state``;
* the router ``mlp.router.weight`` (``[L, E, h]``) and the MoE layer's ``pre_mlp_layernorm`` (key
  ``decoder.layers.mlp.linear_fc1.layer_norm_weight``) follow the dense rule.

Global expert indices make a checkpoint independent of the expert-parallel size: one written here
(as if saved at EP=1) loads at any EP, and one saved at any EP reads back here. Megatron is
imported lazily.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from dapo_megatron.weights import dist_layout, mapping

_LAYERS = "decoder.layers."
_EXPERT_KEY = "mlp.experts.experts."
EXPERT_LINEARS = ("linear_fc1", "linear_fc2")
ATTENTION_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv")


def check_supported(spec: Any) -> None:
    """Raise ``ValueError`` for a spec whose checkpoint layout is not described here.

    Dense specs are all described (:mod:`dist_layout`); MoE specs need routed experts only
    (``mapping.check_spec`` already refuses shared experts) and ``E`` a positive count.
    """
    moe = getattr(spec, "moe", None)
    if moe is None:
        return
    mapping.check_spec(spec)
    if moe.num_experts < 1:
        raise ValueError(f"model_type={spec.model_type!r}: num_experts must be >= 1, got {moe.num_experts}")


def checkpoint_key(megatron_name: str) -> Tuple[str, Optional[int], Optional[int]]:
    """``(key, layer, expert)`` of a local-scheme megatron name.

    ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`` ->
    (``decoder.layers.mlp.experts.experts.linear_fc1.weight``, 3, 5); other names as
    :func:`dist_layout.checkpoint_key` with expert ``None``.
    """
    expert = mapping.expert_of(megatron_name)
    if expert is None:
        key, layer = dist_layout.checkpoint_key(megatron_name)
        return key, layer, None
    layer_s, rest = megatron_name[len(_LAYERS) :].split(".", 1)
    linear = rest.split(mapping.EXPERT_PREFIX, 1)[1].split(".", 1)[1]  # "linear_fc1.weight"
    return f"{_LAYERS}{_EXPERT_KEY}{linear}", int(layer_s), expert


def global_shape(megatron_name: str, shape: Sequence[int], spec: Any) -> Tuple[int, ...]:
    """The checkpoint key's global shape for a tensor of TP=1 ``shape``: ``[L, E, *shape]`` for an
    expert, ``[L, *shape]`` for another layer tensor, ``shape`` outside the layers."""
    _, layer, expert = checkpoint_key(megatron_name)
    if expert is not None:
        return (spec.num_layers, spec.moe.num_experts, *shape)
    return tuple(shape) if layer is None else (spec.num_layers, *shape)


def sharded_tensors(
    megatron_name: str,
    data: Union[Tensor, Sequence[Tensor]],
    spec: Any,
    *,
    explicit_axes: bool = False,
) -> List[Any]:
    """The ShardedTensor(s) of one full (TP=1) megatron tensor, expert or not.

    ``data`` as in :func:`dist_layout.sharded_tensors` (for ``linear_fc1`` the fused tensor or a
    ``(gate, up)`` pair). ``explicit_axes``: describe the tensor as a ``[1, 1, ...]`` slice (expert)
    or ``[1, ...]`` slice (layer) of the global tensor instead of with prepended axes; needed to
    *load* one expert or layer (the load fills ``data`` in place through the unsqueezed view).
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    key, layer, expert = checkpoint_key(megatron_name)
    if expert is None:
        return dist_layout.sharded_tensors(megatron_name, data, spec.num_layers, explicit_layer_axis=explicit_axes)
    assert layer is not None
    axes = ((0, layer, spec.num_layers), (1, expert, spec.moe.num_experts))
    gate_up = mapping.tp_rule(megatron_name) == mapping.GATE_UP
    if gate_up:
        pieces = list(data.chunk(2, dim=0) if isinstance(data, Tensor) else data)
    else:
        assert isinstance(data, Tensor)
        pieces = [data]
    out = []
    for k, piece in enumerate(pieces):
        local = piece.unsqueeze(0).unsqueeze(0) if explicit_axes else piece
        offsets = [*axes, (2, k, 2)] if gate_up else list(axes)
        out.append(
            ShardedTensor.from_rank_offsets(
                key, local, *offsets, replica_id=0, prepend_axis_num=0 if explicit_axes else 2
            )
        )
    return out


def extra_state_objects(layer: int, spec: Any) -> List[Any]:
    """The ``_extra_state`` ShardedObjects (value ``None``, the local spec's) of one layer: the
    dense ones for a dense spec; for a MoE spec the attention linears' (``[L]``) and one per expert
    linear (``[L, E]``), as the built model's ``sharded_state_dict`` has them."""
    from megatron.core.dist_checkpointing import ShardedObject

    moe = getattr(spec, "moe", None)
    if moe is None:
        return dist_layout.extra_state_objects(layer, spec.num_layers)
    L, E = spec.num_layers, moe.num_experts
    out = [ShardedObject(f"{_LAYERS}{m}._extra_state", None, (L,), (layer,), replica_id=0) for m in ATTENTION_LINEARS]
    for e in range(E):
        for lin in EXPERT_LINEARS:
            key = f"{_LAYERS}{_EXPERT_KEY}{lin}._extra_state"
            out.append(ShardedObject(key, None, (L, E), (layer, e), replica_id=0))
    return out

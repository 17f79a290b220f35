"""The megatron dist-checkpoint layout of a dense GPTModel, tensor by tensor.

megatron-core saves a GPTModel's ``sharded_state_dict()`` with *global* keys so that any TP/PP/VPP
layout can load it (checked against 0.16.1):

* layer tensors share one key per kind with the layer as a leading axis:
  ``decoder.layers.0.self_attention.linear_qkv.weight`` is the slice ``[0]`` of key
  ``decoder.layers.self_attention.linear_qkv.weight`` with global shape ``[L, rows, cols]``;
* the norms use the Transformer Engine names in the keys for both specs
  (``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` for ``input_layernorm``);
* ``mlp.linear_fc1.weight`` is stored as two pieces of one key, gate rows then up rows, each
  sharded separately over TP (megatron's swiglu factory), so its TP=1 layout is ``[gate; up]``;
* every linear layer of a layer also has an ``_extra_state`` ShardedObject (``None`` for the local
  spec) that loading requires.

The routed experts of a MoE layer have keys of their own, described in
:mod:`dapo_megatron.weights.expert_layout`, which defers to this module for every other tensor.

Writing these pieces one tensor at a time (instead of from a built model) is what lets
``tools/convert_hf_to_megatron.py`` stream; reading them one layer at a time is what lets
``tools/convert_megatron_to_hf.py`` stream. Megatron is imported lazily, inside the functions.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from dapo_megatron.weights import mapping

# Linear layers of a transformer layer whose (possibly None) extra state the model saves.
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
_LAYERS = "decoder.layers."


def checkpoint_key(megatron_name: str) -> Tuple[str, Optional[int]]:
    """``decoder.layers.3.input_layernorm.weight`` -> (``decoder.layers.self_attention.linear_qkv.
    layer_norm_weight``, 3); names outside the layers keep their name and get ``None``."""
    if not megatron_name.startswith(_LAYERS):
        return megatron_name, None
    index, rest = megatron_name[len(_LAYERS) :].split(".", 1)
    return _LAYERS + mapping.te_megatron_name(rest), int(index)


def sharded_tensors(
    megatron_name: str,
    data: Union[Tensor, Sequence[Tensor]],
    num_layers: int,
    replica_id: int = 0,
    *,
    explicit_layer_axis: bool = False,
) -> List[Any]:
    """The ShardedTensor(s) of one full (TP=1) megatron tensor.

    ``data`` is the tensor, or for ``linear_fc1`` either the fused ``[gate; up]`` tensor or a
    ``(gate, up)`` pair. Pass separate tensors when memory matters: megatron's writer clones a
    tensor that is a view into a larger storage.

    ``explicit_layer_axis``: describe a layer tensor as a ``[1, ...]`` slice of the ``[L, ...]``
    global tensor instead of with megatron's prepended axis. Same storage layout; needed to *load*
    a single layer, because megatron's prepended-axis load path expects this rank to request every
    layer of the key. (Loading fills ``data`` in place through the unsqueezed view.)
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    key, layer = checkpoint_key(megatron_name)
    layer_axis = () if layer is None else ((0, layer, num_layers),)
    prepend = 0 if explicit_layer_axis else len(layer_axis)
    gate_up = mapping.tp_rule(megatron_name) == mapping.GATE_UP
    if gate_up:
        pieces = list(torch.chunk(data, 2, dim=0) if isinstance(data, Tensor) else data)
    else:
        assert isinstance(data, Tensor)
        pieces = [data]
    out = []
    for k, piece in enumerate(pieces):
        local = piece.unsqueeze(0) if explicit_layer_axis and layer is not None else piece
        offsets = [*layer_axis, (len(layer_axis), k, 2)] if gate_up else list(layer_axis)
        out.append(
            ShardedTensor.from_rank_offsets(key, local, *offsets, replica_id=replica_id, prepend_axis_num=prepend)
        )
    return out


def extra_state_objects(layer: int, num_layers: int, replica_id: int = 0) -> List[Any]:
    """The ``_extra_state`` ShardedObjects (value ``None``) of one layer."""
    from megatron.core.dist_checkpointing import ShardedObject

    return [
        ShardedObject(f"{_LAYERS}{m}._extra_state", None, (num_layers,), (layer,), replica_id=replica_id)
        for m in EXTRA_STATE_MODULES
    ]


class ScratchArena:
    """File-backed tensors (``MAP_SHARED`` on files in ``folder``).

    Their pages belong to the page cache, not to the process's anonymous memory: the kernel writes
    them back and evicts them under memory pressure, so a whole converted model can be referenced
    at once (as megatron's save needs) without being resident. One file per tensor, because the
    writer clones views into a larger storage.
    """

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        path = os.path.join(self.folder, uuid.uuid4().hex)
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(tuple(shape))

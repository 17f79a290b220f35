"""Megatron <-> HF name and layout mapping for dense decoder models (pure per-tensor functions).

Everything here takes tensors and scalars (plus a ``spec``: any object with the fields of
:class:`dapo_megatron.megatron.model.ModelSpec`) and never touches ``torch.distributed`` or megatron.

Megatron GPTModel layout (facts checked against megatron-core 0.16.1):

* Fused QKV (``self_attention.linear_qkv``) is interleaved per query group. With ``ng`` query groups,
  ``nh`` heads and head dim ``d``, the weight has ``ng * (nh/ng + 2) * d`` rows; for group ``g`` the
  rows are ``[q heads of g (nh/ng * d rows); k of g (d rows); v of g (d rows)]``
  (``Attention.get_query_key_value_tensors`` views ``[.., ng, (nh/ng + 2) * d]`` then splits).
* Fused gate/up (``mlp.linear_fc1``) is ``[gate; up]`` along dim 0 at TP=1; each TP rank holds
  ``[gate_shard_r; up_shard_r]``, so the full tensor is *not* the concatenation of the rank shards.
* Two naming schemes for the norms feeding a linear layer: the local spec has
  ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``; the Transformer Engine spec fuses them
  as ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight`` (the
  dist-checkpoint keys use the TE names for both specs).
* The vocabulary dimension of ``embedding.word_embeddings.weight`` and ``output_layer.weight`` is
  padded (zeros on import, stripped on export). Tied models have no ``output_layer.weight`` (and HF
  has no ``lm_head.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

NAMINGS = ("local", "te")


@dataclass(frozen=True)
class ArchMapping:
    """HF names of one architecture family. ``{i}`` is the layer index.

    ``qkv_bias_allowed`` / ``qk_norm_allowed``: whether the family can carry a QKV bias or
    per-head Q/K RMSNorm; the spec says whether a given model does.
    """

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer_prefix: str = "model.layers.{i}."
    input_norm: str = "input_layernorm.weight"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj.weight"
    q_norm: str = "self_attn.q_norm.weight"
    k_norm: str = "self_attn.k_norm.weight"
    post_attn_norm: str = "post_attention_layernorm.weight"
    gate: str = "mlp.gate_proj.weight"
    up: str = "mlp.up_proj.weight"
    down: str = "mlp.down_proj.weight"
    router: str = "mlp.gate.weight"
    expert: str = "mlp.experts.{e}."
    qkv_bias_allowed: bool = True
    qk_norm_allowed: bool = False
    moe_allowed: bool = False


# The explicit table (architecture habit 8): HF ``model_type`` -> mapping. The three families share
# HF parameter names; they differ in which optional tensors they may have.
ARCH_MAPPINGS: Dict[str, ArchMapping] = {
    "qwen2": ArchMapping(qkv_bias_allowed=True, qk_norm_allowed=False),
    "qwen3": ArchMapping(qkv_bias_allowed=True, qk_norm_allowed=True),
    "qwen3_moe": ArchMapping(qkv_bias_allowed=False, qk_norm_allowed=True, moe_allowed=True),
    "llama": ArchMapping(qkv_bias_allowed=True, qk_norm_allowed=False),
}


def arch_mapping(model_type: str) -> ArchMapping:
    """The mapping for ``model_type``; unknown types raise ``ValueError`` listing the supported ones."""
    try:
        return ARCH_MAPPINGS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ARCH_MAPPINGS))}"
        ) from None


def check_spec(spec: Any) -> ArchMapping:
    """Validate a spec against its family and return the family's mapping."""
    arch = arch_mapping(spec.model_type)
    if spec.qk_layernorm and not arch.qk_norm_allowed:
        raise ValueError(f"model_type={spec.model_type!r} has no QK layernorm, but the spec asks for one")
    if spec.qkv_bias and not arch.qkv_bias_allowed:
        raise ValueError(f"model_type={spec.model_type!r} has no QKV bias, but the spec asks for one")
    if spec.num_attention_heads % spec.num_query_groups:
        raise ValueError(
            f"num_attention_heads={spec.num_attention_heads} is not a multiple of "
            f"num_query_groups={spec.num_query_groups}"
        )
    moe = getattr(spec, "moe", None)
    if moe is not None and not arch.moe_allowed:
        raise ValueError(f"model_type={spec.model_type!r} has no experts, but the spec asks for {moe.num_experts}")
    if moe is not None and moe.shared_expert_ffn_hidden_size:
        raise ValueError(f"model_type={spec.model_type!r}: shared experts are not mapped to HF names")
    return arch


# ----------------------------------------------------------------------------- per-tensor layout
def merge_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tensor:
    """HF q/k/v (weights ``[nh*d, h]``/``[ng*d, h]`` or biases ``[nh*d]``/``[ng*d]``) -> fused rows.

    Returns ``[ng * (nh/ng + 2) * d, *rest]`` in megatron's per-group order ``[q_g; k_g; v_g]``.
    """
    per = num_heads // num_groups
    rest = q.shape[1:]
    qg = q.reshape(num_groups, per * head_dim, *rest)
    kg = k.reshape(num_groups, head_dim, *rest)
    vg = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_groups * (per + 2) * head_dim, *rest)


def split_qkv(fused: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`merge_qkv`: fused ``[ng*(nh/ng+2)*d, *rest]`` -> (q, k, v), contiguous."""
    per = num_heads // num_groups
    rest = fused.shape[1:]
    g = fused.reshape(num_groups, (per + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).contiguous(),
        k.reshape(num_groups * head_dim, *rest).contiguous(),
        v.reshape(num_groups * head_dim, *rest).contiguous(),
    )


def merge_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """``[ffn, h]`` x 2 -> ``[2*ffn, h]`` = ``[gate; up]`` (megatron's TP=1 linear_fc1)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> Tuple[Tensor, Tensor]:
    """Inverse of :func:`merge_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(t: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows to ``[V, h]`` up to ``[padded_vocab, h]`` (a copy, also when no padding)."""
    if padded_vocab < t.shape[0]:
        raise ValueError(f"padded vocab {padded_vocab} is smaller than the vocab {t.shape[0]}")
    out = t.new_zeros((padded_vocab, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def strip_vocab(t: Tensor, vocab: int) -> Tensor:
    """Drop padding rows: ``[Vp, h]`` -> ``[vocab, h]`` (contiguous)."""
    return t[:vocab].contiguous()


# ----------------------------------------------------------------------------- tensor parallelism
COLUMN, ROW, REPLICATED, GATE_UP = "column", "row", "replicated", "gate_up"


def tp_rule(megatron_name: str) -> str:
    """How megatron splits a parameter over TP ranks.

    * ``column`` (dim 0): linear_qkv weight/bias, word embeddings (vocab-parallel), output_layer.
      For linear_qkv a plain dim-0 chunk is the per-query-group split because the fused rows are
      grouped; with fewer groups than TP ranks a group's rows straddle ranks the same way.
    * ``row`` (dim 1): linear_proj and linear_fc2 weights.
    * ``gate_up``: linear_fc1 weight; rank r holds ``[gate_r; up_r]``.
    * ``replicated``: norms (and anything else).
    """
    if megatron_name.endswith("layer_norm_weight") or "layernorm" in megatron_name:
        return REPLICATED
    if megatron_name.endswith(
        ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
    ):
        return COLUMN
    if megatron_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return ROW
    if megatron_name.endswith("linear_fc1.weight"):
        return GATE_UP
    return REPLICATED


def tp_shard(megatron_name: str, full: Tensor, tp: int, rank: int) -> Tensor:
    """The slice of ``full`` that TP rank ``rank`` of ``tp`` holds (a view where possible)."""
    rule = tp_rule(megatron_name)
    if rule == COLUMN:
        return torch.chunk(full, tp, dim=0)[rank]
    if rule == ROW:
        return torch.chunk(full, tp, dim=1)[rank]
    if rule == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]], dim=0)
    return full


def tp_gather(megatron_name: str, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`tp_shard`: rank-ordered shards -> the full (TP=1) tensor."""
    rule = tp_rule(megatron_name)
    if len(shards) == 1 or rule == REPLICATED:
        return shards[0]
    if rule == COLUMN:
        return torch.cat(list(shards), dim=0)
    if rule == ROW:
        return torch.cat(list(shards), dim=1)
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


# ----------------------------------------------------------------------------- whole-model tables
COPY, QKV, FC1, VOCAB = "copy", "qkv", "fc1", "vocab"

# Layer-local megatron suffix -> (HF suffix(es), kind); the norm entries depend on the naming scheme.
_NORM_NAMES = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "te": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}
_LAYER_RE_PREFIX = "decoder.layers."
# Routed experts of a MoE layer (megatron's SequentialMLP); the index is global in this module's
# names (``expert_name``), local to the EP rank in a built model's parameter names.
EXPERT_PREFIX = "mlp.experts.local_experts."


@dataclass(frozen=True)
class ConvItem:
    """One megatron tensor and the HF tensors it is made of (``kind`` says how)."""

    megatron_name: str
    hf_names: Tuple[str, ...]
    kind: str
    layer: Optional[int] = None
    expert: Optional[int] = None  # global expert index of a routed expert's tensor


def expert_of(megatron_name: str) -> Optional[int]:
    """The expert index in a routed expert's megatron name, else None."""
    if EXPERT_PREFIX not in megatron_name:
        return None
    return int(megatron_name.split(EXPERT_PREFIX, 1)[1].split(".", 1)[0])


def renumber_expert(megatron_name: str, offset: int) -> str:
    """``...local_experts.{j}.rest`` -> ``...local_experts.{j + offset}.rest`` (local <-> global index:
    EP rank ``r`` of ``ep`` holds experts ``r*E/ep .. (r+1)*E/ep - 1`` as local ``0 .. E/ep - 1``)."""
    head, tail = megatron_name.split(EXPERT_PREFIX, 1)
    j, rest = tail.split(".", 1)
    return f"{head}{EXPERT_PREFIX}{int(j) + offset}.{rest}"


def head_dim(spec: Any) -> int:
    return spec.kv_channels or spec.hidden_size // spec.num_attention_heads


def _layer_items(spec: Any, arch: ArchMapping, i: int, naming: str) -> List[ConvItem]:
    hf = arch.layer_prefix.format(i=i)
    mg = f"{_LAYER_RE_PREFIX}{i}."
    in_norm, mlp_norm = _NORM_NAMES[naming]
    items = [
        ConvItem(mg + in_norm, (hf + arch.input_norm,), COPY, i),
        ConvItem(
            mg + "self_attention.linear_qkv.weight", tuple(hf + p + ".weight" for p in (arch.q, arch.k, arch.v)), QKV, i
        ),
    ]
    if spec.qkv_bias:
        items.append(
            ConvItem(
                mg + "self_attention.linear_qkv.bias", tuple(hf + p + ".bias" for p in (arch.q, arch.k, arch.v)), QKV, i
            )
        )
    if spec.qk_layernorm:
        items.append(ConvItem(mg + "self_attention.q_layernorm.weight", (hf + arch.q_norm,), COPY, i))
        items.append(ConvItem(mg + "self_attention.k_layernorm.weight", (hf + arch.k_norm,), COPY, i))
    moe = getattr(spec, "moe", None)
    if moe is not None:  # the MoE layer's norm is never fused into a linear layer, in either spec
        mlp_norm = "pre_mlp_layernorm.weight"
    items += [
        ConvItem(mg + "self_attention.linear_proj.weight", (hf + arch.o,), COPY, i),
        ConvItem(mg + mlp_norm, (hf + arch.post_attn_norm,), COPY, i),
    ]
    if moe is None:
        items.append(ConvItem(mg + "mlp.linear_fc1.weight", (hf + arch.gate, hf + arch.up), FC1, i))
        items.append(ConvItem(mg + "mlp.linear_fc2.weight", (hf + arch.down,), COPY, i))
        return items
    items.append(ConvItem(mg + "mlp.router.weight", (hf + arch.router,), COPY, i))
    for e in range(moe.num_experts):
        he, me = hf + arch.expert.format(e=e), f"{mg}{EXPERT_PREFIX}{e}."
        gate_up = (he + arch.gate.split(".", 1)[1], he + arch.up.split(".", 1)[1])
        items.append(ConvItem(me + "linear_fc1.weight", gate_up, FC1, i, e))
        items.append(ConvItem(me + "linear_fc2.weight", (he + arch.down.split(".", 1)[1],), COPY, i, e))
    return items


def conversion_plan(
    spec: Any,
    naming: str = "local",
    layers: Optional[Iterable[int]] = None,
    include_pre: bool = True,
    include_post: bool = True,
) -> List[ConvItem]:
    """All tensors of the model in a fixed order: embedding, layers 0..L-1, final norm, output layer.

    ``layers`` / ``include_pre`` (embedding) / ``include_post`` (final norm, output layer) select a
    part, e.g. the layers one conversion rank owns.
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    arch = check_spec(spec)
    items: List[ConvItem] = []
    if include_pre:
        items.append(ConvItem("embedding.word_embeddings.weight", (arch.embed,), VOCAB))
    for i in range(spec.num_layers) if layers is None else layers:
        items += _layer_items(spec, arch, i, naming)
    if include_post:
        items.append(ConvItem("decoder.final_layernorm.weight", (arch.final_norm,), COPY))
        if not spec.tied_embeddings:
            items.append(ConvItem("output_layer.weight", (arch.lm_head,), VOCAB))
    return items


def hf_shapes(spec: Any) -> Dict[str, Tuple[int, ...]]:
    """Expected HF tensor name -> shape for ``spec`` (the validation reference for imports)."""
    h, d, ffn = spec.hidden_size, head_dim(spec), spec.ffn_hidden_size
    nh, ng = spec.num_attention_heads, spec.num_query_groups
    arch = check_spec(spec)
    per_suffix = {
        arch.input_norm: (h,),
        arch.post_attn_norm: (h,),
        f"{arch.q}.weight": (nh * d, h),
        f"{arch.k}.weight": (ng * d, h),
        f"{arch.v}.weight": (ng * d, h),
        f"{arch.q}.bias": (nh * d,),
        f"{arch.k}.bias": (ng * d,),
        f"{arch.v}.bias": (ng * d,),
        arch.q_norm: (d,),
        arch.k_norm: (d,),
        arch.o: (h, nh * d),
        arch.gate: (ffn, h),
        arch.up: (ffn, h),
        arch.down: (h, ffn),
    }
    moe = getattr(spec, "moe", None)
    if moe is not None:
        eff = moe.ffn_hidden_size
        per_suffix[arch.router] = (moe.num_experts, h)
        expert = {"gate_proj.weight": (eff, h), "up_proj.weight": (eff, h), "down_proj.weight": (h, eff)}
    shapes = {arch.embed: (spec.vocab_size, h), arch.final_norm: (h,), arch.lm_head: (spec.vocab_size, h)}
    out: Dict[str, Tuple[int, ...]] = {}
    for item in conversion_plan(spec):
        for name in item.hf_names:
            prefix = arch.layer_prefix.format(i=item.layer) if item.layer is not None else ""
            if item.expert is not None:
                out[name] = expert[name.rsplit(".", 2)[-2] + ".weight"]
            else:
                out[name] = shapes[name] if item.layer is None else per_suffix[name[len(prefix) :]]
    return out


def megatron_shapes(spec: Any, padded_vocab: int, naming: str = "local") -> Dict[str, Tuple[int, ...]]:
    """Expected megatron (TP=1) name -> shape; must equal the built GPTModel's ``state_dict`` shapes."""
    hf = hf_shapes(spec)
    out = {}
    for item in conversion_plan(spec, naming):
        first = hf[item.hf_names[0]]
        if item.kind == QKV:
            out[item.megatron_name] = (sum(hf[n][0] for n in item.hf_names), *first[1:])
        elif item.kind == FC1:
            out[item.megatron_name] = (2 * first[0], *first[1:])
        elif item.kind == VOCAB:
            out[item.megatron_name] = (padded_vocab, *first[1:])
        else:
            out[item.megatron_name] = first
    return out


def to_megatron(spec: Any, item: ConvItem, tensors: Sequence[Tensor], padded_vocab: int) -> Tensor:
    """Build ``item``'s megatron tensor from its HF tensors (in ``item.hf_names`` order)."""
    if item.kind == QKV:
        return merge_qkv(*tensors, spec.num_attention_heads, spec.num_query_groups, head_dim(spec))
    if item.kind == FC1:
        return merge_gate_up(*tensors)
    if item.kind == VOCAB:
        return pad_vocab(tensors[0], padded_vocab)
    return tensors[0]


def hf_to_megatron(
    spec: Any,
    hf_name_to_tensor_getter: Callable[[str], Tensor],
    *,
    padded_vocab: Optional[int] = None,
    naming: str = "local",
    plan: Optional[List[ConvItem]] = None,
) -> Iterator[Tuple[str, Tensor]]:
    """Yield ``(megatron_name, tensor)`` in :func:`conversion_plan` order (or ``plan``'s order).

    Streaming: only the HF tensors of the current item (at most 3) are fetched at a time, and
    nothing is kept after the item is yielded. ``padded_vocab`` defaults to ``spec.vocab_size``.
    """
    padded = spec.vocab_size if padded_vocab is None else padded_vocab
    for item in conversion_plan(spec, naming) if plan is None else plan:
        tensors = [hf_name_to_tensor_getter(n) for n in item.hf_names]
        yield item.megatron_name, to_megatron(spec, item, tensors, padded)


def normalize_megatron_name(name: str) -> str:
    """Map TE-spec norm names onto the local-spec names (``local`` is the canonical scheme)."""
    for te, local in zip(_NORM_NAMES["te"], _NORM_NAMES["local"]):
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


def te_megatron_name(name: str) -> str:
    """Map local-spec norm names onto the TE-spec names (the names dist-checkpoint keys use)."""
    for te, local in zip(_NORM_NAMES["te"], _NORM_NAMES["local"]):
        if name == local or name.endswith("." + local):
            return name[: -len(local)] + te
    return name


def conversion_index(spec: Any) -> Dict[str, ConvItem]:
    """Local-scheme megatron name -> :class:`ConvItem`, for :func:`megatron_to_hf` lookups."""
    return {item.megatron_name: item for item in conversion_plan(spec, "local")}


def megatron_to_hf(
    spec: Any, megatron_name: str, tensor: Tensor, index: Optional[Dict[str, ConvItem]] = None
) -> List[Tuple[str, Tensor]]:
    """One megatron (TP=1, full) tensor -> its HF tensors. Accepts both naming schemes.

    Returns ``[]`` for ``_extra_state`` entries and for ``output_layer.weight`` of a tied model (the
    last PP stage keeps a copy of the embedding there). Unknown names raise ``KeyError``. Pass
    ``index`` (from :func:`conversion_index`) to avoid rebuilding the table per call.
    """
    if megatron_name.endswith("_extra_state"):
        return []
    if megatron_name == "output_layer.weight" and spec.tied_embeddings:
        return []
    index = conversion_index(spec) if index is None else index
    item = index.get(normalize_megatron_name(megatron_name))
    if item is None:
        raise KeyError(f"no HF mapping for megatron parameter {megatron_name!r} (model_type={spec.model_type!r})")
    if item.kind == QKV:
        parts = split_qkv(tensor, spec.num_attention_heads, spec.num_query_groups, head_dim(spec))
    elif item.kind == FC1:
        parts = split_gate_up(tensor)
    elif item.kind == VOCAB:
        parts = (strip_vocab(tensor, spec.vocab_size),)
    else:
        parts = (tensor,)
    return list(zip(item.hf_names, parts))

"""What each GPU holds of a model, on paper: the shape, the trainer layout and parameters per GPU.

Pure python: no torch, no megatron. Dense decoders (Qwen2 / Qwen3 / Llama) and Qwen-style
mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE: every layer's MLP is ``num_experts`` routed SwiGLU
experts, ``top_k`` per token, plus an optional shared expert). :mod:`memory_plan` builds the memory
plan on top of these counts.

How megatron-core shards a MoE layer (``initialize_model_parallel``, ``MoELayer``):

* attention, norms and the shared expert are dense parts: split by TP (norms replicated), layers split
  by PP, replicated over DP;
* the router weight ``[E, h]`` is replicated on every rank (not split by TP or EP);
* the routed experts are split over expert parallelism (``E / ep`` experts per rank) and each expert's
  width over expert-tensor parallelism (``etp``, megatron's ``expert_tensor_parallel_size``, which
  defaults to TP);
* the expert weights are replicated over the expert-data-parallel group of ``world / (etp * ep * pp)``
  ranks (context parallelism folds into it), so the distributed optimizer shards expert state over that
  group and dense state over DP x CP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


def gib(n_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes)."""
    return n_bytes / GIB


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (``bf16``, ``fp16``, ``fp32`` or their torch spellings)."""
    if name not in DTYPE_BYTES:
        raise ValueError(f"params_dtype={name!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _divides(value: int, by: int, what: str, by_what: str) -> None:
    if by < 1 or value % by != 0:
        raise ValueError(f"{what}={value} is not divisible by {by_what}={by}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name}={getattr(obj, name)} must be >= 1")


# ----------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """Decoder shape. Widths in elements; ``head_dim`` defaults to ``hidden // num_heads``.

    Dense when ``num_experts == 0``. Otherwise every layer is a MoE layer: ``num_experts`` routed
    SwiGLU experts of width ``moe_ffn_hidden``, ``top_k`` of them per token, and a shared expert of
    width ``shared_ffn_hidden`` (0: none); ``ffn_hidden`` (the dense MLP width) is then unused.
    ``qk_norm``: RMSNorm over each head's queries and keys (Qwen3), two ``head_dim`` weights a layer.
    """

    num_layers: int
    hidden: int
    ffn_hidden: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool = False
    qkv_bias: bool = True
    head_dim: int = 0
    name: str = ""
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    shared_ffn_hidden: int = 0
    qk_norm: bool = False

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "hidden", "ffn_hidden", "num_heads", "num_kv_heads", "vocab_size")
        if self.head_dim == 0:
            _divides(self.hidden, self.num_heads, "hidden", "num_heads")
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)
        _divides(self.num_heads, self.num_kv_heads, "num_heads", "num_kv_heads")
        if self.num_experts < 0 or self.shared_ffn_hidden < 0:
            raise ValueError("num_experts and shared_ffn_hidden must be >= 0")
        if self.is_moe:
            if not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
            _positive(self, "moe_ffn_hidden")
        elif self.top_k or self.moe_ffn_hidden or self.shared_ffn_hidden:
            raise ValueError("top_k, moe_ffn_hidden and shared_ffn_hidden need num_experts > 0")

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts shape."""
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (elements)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or all value) heads together (elements)."""
        return self.num_kv_heads * self.head_dim


def _moe_fields(cfg: Mapping[str, Any]) -> Dict[str, int]:
    """The MoE keywords of ModelShape from Qwen-MoE HF keys ({} for a dense config)."""
    for key in ("num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise ValueError(f"{key}={cfg[key]}: only Qwen-style MoE configs (num_experts) are modelled")
    if not cfg.get("num_experts"):
        return {}
    if int(cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
        raise ValueError("decoder_sparse_step != 1 / mlp_only_layers: MoE configs with dense layers are not modelled")
    return {
        "num_experts": int(cfg["num_experts"]),
        "top_k": int(cfg["num_experts_per_tok"]),
        "moe_ffn_hidden": int(cfg["moe_intermediate_size"]),
        "shared_ffn_hidden": int(cfg.get("shared_expert_intermediate_size") or 0),
    }


def shape_from_hf_config(cfg: Mapping[str, Any], name: str = "") -> ModelShape:
    """ModelShape from an HF ``config.json`` dict: Qwen2 / Qwen3 / Llama keys, and for MoE ``num_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size`` and ``shared_expert_intermediate_size``."""
    model_type = str(cfg.get("model_type", ""))
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        bias = cfg.get("qkv_bias", cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))
        return ModelShape(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            ffn_hidden=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(bias),
            head_dim=int(cfg.get("head_dim") or 0),
            name=name or str(cfg.get("_name_or_path", "")),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **_moe_fields(cfg),
        )
    except KeyError as e:
        raise ValueError(f"HF config lacks the key {e.args[0]!r}") from None


def _qwen3_moe(layers: int, hidden: int, heads: int, moe_ffn: int, name: str) -> ModelShape:
    """A Qwen3-MoE shape (HF configs: 128 experts, top-8, 4 KV heads of 128, untied, no QKV bias)."""
    # ffn_hidden: HF's intermediate_size (3h in both configs), unused since every layer is MoE
    return ModelShape(layers, hidden, 3 * hidden, heads, 4, 151936, qkv_bias=False, head_dim=128, name=name,
                      num_experts=128, top_k=8, moe_ffn_hidden=moe_ffn, qk_norm=True)  # fmt: skip


PRESETS: Dict[str, ModelShape] = {
    "qwen2.5-1.5b": ModelShape(28, 1536, 8960, 12, 2, 151936, tied_embeddings=True, name="Qwen2.5-1.5B"),
    "qwen2.5-7b": ModelShape(28, 3584, 18944, 28, 4, 152064, name="Qwen2.5-7B"),
    "qwen2.5-32b": ModelShape(64, 5120, 27648, 40, 8, 152064, name="Qwen2.5-32B"),
    "qwen3-30b-a3b": _qwen3_moe(48, 2048, 32, 768, "Qwen3-30B-A3B"),
    "qwen3-235b-a22b": _qwen3_moe(94, 4096, 64, 1536, "Qwen3-235B-A22B"),
}
# Total parameter counts as published (model cards / safetensors index), for a sanity check, and
# the activated parameters per token of the MoE presets.
PUBLISHED_PARAMS: Dict[str, float] = {
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-32b": 32.8e9,
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-235b-a22b": 235e9,
}
PUBLISHED_ACTIVE_PARAMS: Dict[str, float] = {"qwen3-30b-a3b": 3.3e9, "qwen3-235b-a22b": 22e9}


def preset(name: str) -> ModelShape:
    """A built-in shape by name (case-insensitive), e.g. ``qwen2.5-32b`` or ``qwen3-30b-a3b``."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[key]


# ----------------------------------------------------------------------------- parameter counts
def layer_params(shape: ModelShape) -> tuple[int, int]:
    """Dense parameters of one layer as ``(split by TP, replicated on every TP rank)``; the routed
    experts are not included (:func:`expert_layer_params`).

    Split: Q, K, V and output projections (``h*(a*d) + 2*h*(g*d) + (a*d)*h``), the QKV bias
    (``a*d + 2*g*d``, column-parallel) and the SwiGLU MLP (gate, up, down: ``3*h*f``); for MoE the
    shared expert's ``3*h*f_s`` instead of the MLP.
    Replicated: the two RMSNorm weights (``2*h``), the QK norms (``2*d``), and for MoE the router
    (``E*h``) and the shared expert's sigmoid gate (``h``).
    """
    h = shape.hidden
    split = h * shape.q_dim + 2 * h * shape.kv_dim + shape.q_dim * h
    split += 3 * h * (shape.shared_ffn_hidden if shape.is_moe else shape.ffn_hidden)
    if shape.qkv_bias:
        split += shape.q_dim + 2 * shape.kv_dim
    repl = 2 * h + (2 * shape.head_dim if shape.qk_norm else 0)
    if shape.is_moe:
        repl += shape.num_experts * h + (h if shape.shared_ffn_hidden else 0)
    return split, repl


def expert_layer_params(shape: ModelShape) -> int:
    """Routed-expert parameters of one layer, all experts: ``E * 3 * h * f_m`` (gate, up, down); 0 if dense."""
    return shape.num_experts * 3 * shape.hidden * shape.moe_ffn_hidden


def param_count(shape: ModelShape) -> int:
    """Total parameters as HF counts them (unpadded vocabulary; a tied output layer counted once)."""
    split, repl = layer_params(shape)
    embeddings = shape.vocab_size * shape.hidden * (1 if shape.tied_embeddings else 2)
    return shape.num_layers * (split + repl + expert_layer_params(shape)) + embeddings + shape.hidden  # + final norm


def active_param_count(shape: ModelShape) -> int:
    """Parameters one token uses: :func:`param_count` with ``top_k`` of the ``E`` experts per layer."""
    routed = expert_layer_params(shape) // shape.num_experts * shape.top_k if shape.is_moe else 0
    return param_count(shape) - shape.num_layers * (expert_layer_params(shape) - routed)


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary rounded up to a multiple of ``multiple * tp`` (megatron's padding)."""
    step = multiple * tp
    return math.ceil(vocab_size / step) * step


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Trainer parallel layout: degrees, sequence parallelism, distributed optimizer.

    ``ep``: expert parallelism; ``etp``: expert-tensor parallelism, 0 meaning megatron's default (= tp).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    vocab_multiple: int = 128
    ep: int = 1
    etp: int = 0

    def __post_init__(self) -> None:
        _positive(self, "tp", "pp", "dp", "cp", "vpp", "vocab_multiple", "ep")
        if self.etp < 0:
            raise ValueError(f"etp={self.etp} must be >= 1 (or 0: the same as tp)")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pp > 1 (an interleaved schedule)")

    @property
    def world_size(self) -> int:
        """GPUs of the trainer: TP x PP x DP x CP."""
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_tp(self) -> int:
        """Expert-tensor-parallel degree (``etp``, or ``tp`` when 0)."""
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel degree: ``world / (etp * ep * pp)`` (CP folds into it)."""
        return self.world_size // (self.expert_tp * self.ep * self.pp)


def check_layout(shape: ModelShape, layout: Layout, seq_len: int) -> None:
    """Raise ValueError naming the field when megatron could not build ``shape`` at ``layout``."""
    _divides(shape.num_heads, layout.tp, "num_heads", "tp")
    _divides(shape.num_kv_heads, layout.tp, "num_kv_heads", "tp")
    if not shape.is_moe:
        _divides(shape.ffn_hidden, layout.tp, "ffn_hidden", "tp")
    _divides(shape.num_layers, layout.pp * layout.vpp, "num_layers", "pp*vpp")
    if layout.cp > 1:
        _divides(seq_len, 2 * layout.cp, "seq_len", "2*cp")
    if layout.sequence_parallel:
        _divides(seq_len // layout.cp, layout.tp, "seq_len/cp", "tp")
    if shape.is_moe:
        _check_moe_layout(shape, layout)
    elif layout.ep > 1:
        raise ValueError(f"ep={layout.ep} needs a mixture-of-experts model (num_experts > 0)")


def _check_moe_layout(shape: ModelShape, layout: Layout) -> None:
    _divides(shape.num_experts, layout.ep, "num_experts", "ep")
    _divides(shape.moe_ffn_hidden, layout.expert_tp, "moe_ffn_hidden", "etp")
    _divides(shape.shared_ffn_hidden, layout.tp, "shared_ffn_hidden", "tp")
    _divides(layout.world_size, layout.expert_tp * layout.ep * layout.pp, "world_size", "etp*ep*pp")
    if layout.tp > 1 and not layout.sequence_parallel:  # MoELayer refuses to train without it
        raise ValueError(f"sequence_parallel=False: megatron trains MoE layers at tp={layout.tp} only with it")


def stage_expert_params(shape: ModelShape, layout: Layout) -> int:
    """Routed-expert parameters one GPU of any pipeline stage holds: its ``L/pp`` layers' ``E/ep``
    experts, each split over ``etp``: ``L/pp * E*3*h*f_m / (ep * etp)``."""
    return shape.num_layers // layout.pp * expert_layer_params(shape) // (layout.ep * layout.expert_tp)


def stage_params(shape: ModelShape, layout: Layout, stage: int) -> int:
    """Parameters held by one GPU of pipeline ``stage`` (0-based): its layers' TP shard, the TP-replicated
    norms (and router), its expert shard, the embedding shard on stage 0, and the final norm and
    output layer shard on the last stage."""
    split, repl = layer_params(shape)
    layers = shape.num_layers // layout.pp
    n = layers * (split // layout.tp + repl) + stage_expert_params(shape, layout)
    vocab_shard = padded_vocab(shape.vocab_size, layout.tp, layout.vocab_multiple) // layout.tp
    last = stage == layout.pp - 1
    if stage == 0:
        n += vocab_shard * shape.hidden
    if last:
        n += shape.hidden
        if not shape.tied_embeddings or layout.pp > 1:  # tied + PP > 1: a copy on the last stage
            n += vocab_shard * shape.hidden
    return n

"""Build a megatron-core GPTModel from a HuggingFace config (Qwen2, Qwen3, Llama, Qwen3-MoE).

Three steps, each a plain function:

1. :func:`model_spec_from_hf` reads an HF ``config.json`` (transformers v4 or v5 layout) into a
   :class:`ModelSpec` through :data:`ARCHITECTURES`, a dict keyed on HF ``model_type``. Anything the
   megatron model would silently get wrong (biases on o_proj, sliding windows, unsupported rope
   scaling, non-SiLU MLPs) raises ``ValueError`` here.
2. :func:`transformer_config` turns the spec, the :class:`Topology` and ``cfg.model`` into a
   megatron ``TransformerConfig`` (dtypes, CPU initialisation, recompute, FP8 checks).
3. :func:`build_model_chunks` builds one ``GPTModel`` per virtual-pipeline chunk of this rank.

Needs ``init_model_parallel`` to have run for step 3 only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F

from dapo_megatron.config import ConfigError, ModelConfig
from dapo_megatron.megatron.moe import (
    MoESpec,
    check_expert_tensor,
    mark_expert_params,
    moe_config_kwargs,
    moe_spec_from_hf,
    prepare_moe_build,
)
from dapo_megatron.parallel.topology import Topology, check_model_fits

if TYPE_CHECKING:  # megatron-core is imported lazily, inside the functions that need it
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = [
    "ARCHITECTURES",
    "MEGATRON_LLAMA3_ROPE",
    "ModelSpec",
    "build_model_chunks",
    "layer_spec",
    "model_spec_from_hf",
    "padded_vocab_size",
    "resolve_transformer_impl",
    "transformer_config",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# megatron-core's RotaryEmbedding._apply_scaling takes only the factor from GPTModel; the other Llama 3
# constants are its defaults (Llama 3.1 values). HF configs must match them exactly.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only model, in megatron terms.

    Fields:
        model_type: HF ``model_type`` (a key of :data:`ARCHITECTURES`).
        num_layers: transformer layers.
        hidden_size: model width.
        ffn_hidden_size: MLP inner width (SwiGLU: each of gate and up has this width).
        num_attention_heads: query heads.
        num_query_groups: key/value heads (GQA groups).
        kv_channels: per-head dimension (``head_dim``); may differ from hidden/heads (Qwen3).
        vocab_size: tokenizer vocabulary of the HF model (before megatron padding).
        max_position_embeddings: longest position the model was configured for.
        rope_theta: rotary base.
        rms_norm_eps: epsilon of every RMSNorm.
        qkv_bias: bias on the q, k and v projections (Qwen2).
        qk_layernorm: RMSNorm over each head of q and k before rope (Qwen3).
        tied_embeddings: the output layer shares the input embedding matrix.
        rope_scaling: ``None`` or Llama 3 scaling ``{"rope_type": "llama3", "factor",
            "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``.
        moe: ``None`` (dense) or the experts of every layer's MLP (Qwen3-MoE).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    qk_layernorm: bool
    tied_embeddings: bool
    rope_scaling: Optional[dict] = None
    moe: Optional[MoESpec] = None


# ----------------------------------------------------------------------------- HF config -> spec
def _require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"HF config ({hf.get('model_type')!r}) lacks required key {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from v4 (``rope_theta`` + ``rope_scaling``) or v5
    (``rope_parameters``) layouts."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)")
    out = {"rope_type": "llama3", "factor": float(_require(scaling, "factor"))}
    for key, megatron_value in MEGATRON_LLAMA3_ROPE.items():
        value = float(_require(scaling, key))
        if value != megatron_value:
            raise ValueError(
                f"llama3 rope scaling {key}={value:g} is not supported: megatron-core's RotaryEmbedding "
                f"hard-codes {key}={megatron_value:g} (only 'factor' is configurable)"
            )
        out[key] = int(value) if key == "original_max_position_embeddings" else value
    return float(theta), out


def _common(hf: Mapping[str, Any], *, qkv_bias: bool, qk_layernorm: bool) -> ModelSpec:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; these architectures use SwiGLU (silu)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported (megatron attention here is full causal)")
    heads = int(_require(hf, "num_attention_heads"))
    hidden = int(_require(hf, "hidden_size"))
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling = _rope(hf)
    return ModelSpec(
        model_type=hf["model_type"],
        num_layers=int(_require(hf, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(head_dim),
        vocab_size=int(_require(hf, "vocab_size")),
        max_position_embeddings=int(_require(hf, "max_position_embeddings")),
        rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_layernorm=qk_layernorm,
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
    )


def _no_extra_bias(hf: Mapping[str, Any]) -> None:
    # HF attention_bias adds biases to q, k, v *and* o_proj; megatron's add_qkv_bias covers q, k, v only.
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=True is not supported for model_type {hf['model_type']!r}")


def _qwen2(hf: dict) -> ModelSpec:
    return _common(hf, qkv_bias=True, qk_layernorm=False)  # Qwen2 always has q/k/v biases, no o_proj bias


def _qwen3(hf: dict) -> ModelSpec:
    _no_extra_bias(hf)
    return _common(hf, qkv_bias=False, qk_layernorm=True)


def _llama(hf: dict) -> ModelSpec:
    _no_extra_bias(hf)
    if int(hf.get("pretraining_tp", 1)) != 1:
        raise ValueError("llama pretraining_tp != 1 is not supported")
    return _common(hf, qkv_bias=False, qk_layernorm=False)


def _qwen3_moe(hf: dict) -> ModelSpec:
    return dataclasses.replace(_qwen3(hf), moe=moe_spec_from_hf(hf))


ARCHITECTURES: dict[str, Callable[[dict], ModelSpec]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "llama": _llama,
    "qwen3_moe": _qwen3_moe,
}


def model_spec_from_hf(hf_config: dict | str | os.PathLike) -> ModelSpec:
    """Read an HF config (a dict, a ``config.json`` path, or a folder holding one) into a ModelSpec."""
    if isinstance(hf_config, Mapping):
        hf = dict(hf_config)
    else:
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported HF model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type](hf)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary rounded up to a multiple of ``multiple * tp`` (each TP shard a multiple of ``multiple``)."""
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size needs positive values, got {vocab_size=}, {tp=}, {multiple=}")
    step = multiple * tp
    return math.ceil(vocab_size / step) * step


# ----------------------------------------------------------------------------- spec -> TransformerConfig
def _te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(model_cfg: ModelConfig) -> str:
    """``local`` or ``transformer_engine`` for ``model.transformer_impl`` on this machine.

    ``auto`` picks Transformer Engine when it is importable and CUDA is available. Raises
    ``ConfigError`` for an explicit ``transformer_engine`` that cannot be honoured, and for
    ``model.fp8`` without Transformer Engine and CUDA.
    """
    have_te, have_cuda = _te_importable(), torch.cuda.is_available()
    missing = [
        name
        for name, ok in (("Transformer Engine (import transformer_engine)", have_te), ("CUDA", have_cuda))
        if not ok
    ]
    if model_cfg.fp8 is not None and missing:
        raise ConfigError(
            f"model.fp8: FP8 ({model_cfg.fp8!r}, recipe {model_cfg.fp8_recipe!r}) needs Transformer Engine on CUDA; "
            f"missing: {' and '.join(missing)}. Set model.fp8 to null to train without FP8."
        )
    if model_cfg.transformer_impl == "transformer_engine":
        if missing:
            raise ConfigError(
                f"model.transformer_impl: 'transformer_engine' needs {' and '.join(missing)}; "
                "use 'local' (megatron-core torch layers) or 'auto'"
            )
        return "transformer_engine"
    if model_cfg.transformer_impl == "auto":
        return "local" if missing else "transformer_engine"
    return "local"


def _literal_values(tp: Any) -> set:
    """All Literal values inside a (possibly Optional) type annotation."""
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    return set().union(*(_literal_values(arg) for arg in typing.get_args(tp))) if typing.get_args(tp) else set()


def _fp8_kwargs(model_cfg: ModelConfig, config_cls: type) -> dict:
    if model_cfg.fp8 is None:
        return {}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if "fp8" not in fields or "fp8_recipe" not in fields:
        raise ConfigError("model.fp8: the installed megatron-core TransformerConfig has no fp8/fp8_recipe fields")
    allowed = _literal_values(fields["fp8_recipe"].type)
    if allowed and model_cfg.fp8_recipe not in allowed:
        raise ConfigError(
            f"model.fp8_recipe: {model_cfg.fp8_recipe!r} is not supported by the installed megatron-core "
            f"(it accepts {', '.join(sorted(map(str, allowed)))})"
        )
    return {"fp8": model_cfg.fp8, "fp8_recipe": model_cfg.fp8_recipe}


def _recompute_kwargs(model_cfg: ModelConfig) -> dict:
    if model_cfg.recompute_granularity is None:
        return {}
    if model_cfg.recompute_granularity == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": model_cfg.recompute_method,
        "recompute_num_layers": model_cfg.recompute_num_layers,
    }


def transformer_config(
    spec: ModelSpec,
    topology: Topology,
    model_cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    training: bool = True,
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for ``spec`` split over ``topology``.

    ``training=False`` admits layouts only a forward in eval mode can run (MoE with TP > 1 and no
    sequence parallelism, which megatron-core refuses in training mode).

    Raises ``ConfigError`` for FP8 or Transformer Engine requests this machine cannot honour and
    ``ValueError`` when the model does not divide over the topology.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_model_fits(
        topology,
        num_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
    )
    impl = resolve_transformer_impl(model_cfg)
    on_cpu = not torch.cuda.is_available()
    if sequence_parallel and impl != "transformer_engine":
        # The local spec's norm (megatron WrappedTorchNorm) asserts sequence_parallel is off: torch's
        # RMSNorm weights carry no sequence_parallel mark, so their grads would not be summed over TP.
        raise ConfigError(
            f"parallel.sequence_parallel needs Transformer Engine layers on CUDA, but model.transformer_impl="
            f"{model_cfg.transformer_impl!r} resolved to 'local' on this machine: megatron-core's local layers use "
            "torch norms, which do not support sequence parallelism. Turn parallel.sequence_parallel off"
        )
    if spec.moe is not None and training and topology.tp > 1 and not sequence_parallel:
        raise ConfigError(
            f"parallel.tensor: a MoE model at tensor={topology.tp} needs parallel.sequence_parallel (megatron-core "
            "refuses MoE with tensor parallelism and without sequence parallelism in training), and sequence "
            "parallelism needs Transformer Engine layers; on CPU keep parallel.tensor=1 and split the experts "
            "with parallel.expert and/or parallel.expert_tensor"
        )
    dtype = _DTYPES[model_cfg.params_dtype]
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        # architecture: pre-norm RMSNorm, SwiGLU, no linear biases except (optionally) q/k/v
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        # parallelism
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        virtual_pipeline_model_parallel_size=topology.vpp if topology.vpp > 1 else None,
        context_parallel_size=topology.cp,
        expert_model_parallel_size=topology.ep,
        expert_tensor_parallel_size=topology.etp,
        sequence_parallel=sequence_parallel,
        # Interleaved PP at pp=2 with batched p2p pairs sends wrongly on gloo (silently wrong grads);
        # unbatched p2p is exact everywhere, and on CPU speed does not matter.
        batch_p2p_comm=not on_cpu,
        variable_seq_lengths=True,  # micro-batches are packed to different lengths
        deallocate_pipeline_outputs=True,
        # dtypes
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        transformer_impl=impl,
        **_recompute_kwargs(model_cfg),
        **_fp8_kwargs(model_cfg, TransformerConfig),
        **_dispatcher_kwargs(spec, topology, model_cfg, impl),
    )


def _dispatcher_kwargs(spec: ModelSpec, topology: Topology, model_cfg: ModelConfig, impl: str) -> dict:
    check_expert_tensor(spec.moe, topology.tp, topology.etp)
    # Dense models still name a dispatcher: megatron rejects its default (allgather) with variable lengths.
    moe = moe_config_kwargs(spec.moe, model_cfg, topology.ep, transformer_engine=impl == "transformer_engine")
    return moe or {"moe_token_dispatcher_type": "alltoall"}


def layer_spec(model_cfg: ModelConfig, *, qk_layernorm: bool = False, num_experts: Optional[int] = None) -> ModuleSpec:
    """Transformer layer ``ModuleSpec``: Transformer Engine layers (grouped-GEMM experts) or
    megatron-core's torch layers (one ``MLP`` per expert); ``num_experts=None`` is a dense MLP."""
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_transformer_impl(model_cfg) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm, normalization="RMSNorm"
    )


# ----------------------------------------------------------------------------- build
def build_model_chunks(
    spec: ModelSpec,
    topology: Topology,
    model_cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    training: bool = True,
) -> list[GPTModel]:
    """This rank's model: one ``GPTModel`` per virtual-pipeline chunk (a list of length ``vpp``).

    Chunk ``i`` holds this pipeline rank's ``i``-th slice of layers; only chunk 0 of pipeline rank 0
    has the embedding and only the last chunk of the last pipeline rank has the output layer. The
    vocabulary is padded with :func:`padded_vocab_size` (the padded rows produce real logits; mask
    them with ``valid_vocab_size`` in the log-prob code). Needs ``init_model_parallel(topology)``.
    ``training``: see :func:`transformer_config`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    # Validate the request (FP8, TE, divisibility) before touching any parallel state or weights.
    config = transformer_config(spec, topology, model_cfg, sequence_parallel=sequence_parallel, training=training)
    layers = layer_spec(model_cfg, qk_layernorm=spec.qk_layernorm, num_experts=spec.moe and spec.moe.num_experts)
    if spec.moe is not None:
        prepare_moe_build()
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_model_chunks: call init_model_parallel() first")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if actual != (topology.tp, topology.pp):
        raise ValueError(f"topology tp={topology.tp}, pp={topology.pp} but megatron was initialised with {actual}")
    vocab = padded_vocab_size(spec.vocab_size, topology.tp)
    scaling = spec.rope_scaling
    chunks = []
    for stage in range(topology.vpp):
        vp_stage = stage if topology.vpp > 1 else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=layers,
                vocab_size=vocab,
                max_sequence_length=spec.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=spec.tied_embeddings,
                position_embedding_type="rope",
                rotary_base=spec.rope_theta,
                rope_scaling=scaling is not None,
                rope_scaling_factor=scaling["factor"] if scaling else 8.0,
                vp_stage=vp_stage,
            )
        )
    if spec.moe is not None:
        mark_expert_params(chunks, topology)
    return chunks

"""Mixture-of-experts pieces of the megatron model build (Qwen3-MoE on megatron-core).

Three pure-ish helpers that :mod:`dapo_megatron.megatron.model` calls:

* :func:`moe_spec_from_hf` reads the MoE fields of an HF config into a :class:`MoESpec`, refusing
  by key what the megatron model would get wrong (dense layers interleaved with MoE layers).
* :func:`moe_config_kwargs` gives the ``TransformerConfig`` keyword arguments of a MoE model:
  router top-k with HF's normalisation, expert width, aux loss, dispatcher, capacity factor.
* :func:`prepare_moe_build` resets megatron's router-replay registry and lets its all-to-all
  dispatcher run without CUDA.

Routing equivalence (checked against transformers 5 ``Qwen3MoeTopKRouter`` and megatron-core 0.16.1
``topk_routing_with_score_function``): HF takes ``softmax`` over all experts, then the top-k, then
(``norm_topk_prob``) divides by their sum. ``norm_topk_prob=True`` equals megatron's default
(top-k of the logits, then softmax over those k); ``norm_topk_prob=False`` equals megatron's
``moe_router_pre_softmax=True`` (softmax over all experts, then top-k, no renormalisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dapo_megatron.config import ConfigError
from dapo_megatron.megatron import moe_gloo


@dataclass(frozen=True)
class MoESpec:
    """Expert layout of a MoE decoder (every layer's MLP is a MoE block).

    Fields:
        num_experts: routed experts per layer (``E``).
        topk: experts each token is sent to (``k <= E``).
        ffn_hidden_size: inner width of one expert (HF ``moe_intermediate_size``).
        norm_topk_prob: the top-k routing probabilities are renormalised to sum to 1.
        shared_expert_ffn_hidden_size: inner width of the always-on shared expert; 0 means none
            (Qwen3-MoE has none).
    """

    num_experts: int
    topk: int
    ffn_hidden_size: int
    norm_topk_prob: bool
    shared_expert_ffn_hidden_size: int = 0


def _int_key(hf: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if hf.get(key) is not None:
            return int(hf[key])
    raise ValueError(f"HF config ({hf.get('model_type')!r}) lacks required key {' or '.join(map(repr, keys))}")


def moe_spec_from_hf(hf: Mapping[str, Any]) -> MoESpec:
    """The :class:`MoESpec` of a Qwen3-MoE HF config (transformers v4 or v5 keys).

    Raises ``ValueError`` naming the key for layouts megatron's uniform MoE stack cannot express:
    ``decoder_sparse_step != 1`` or a non-empty ``mlp_only_layers`` (dense MLP layers between the
    MoE layers), and a top-k larger than the expert count.
    """
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    if step != 1:
        raise ValueError(
            f"decoder_sparse_step={step} is not supported: only every-layer MoE (decoder_sparse_step=1) is built"
        )
    if hf.get("mlp_only_layers"):
        raise ValueError(
            f"mlp_only_layers={list(hf['mlp_only_layers'])} is not supported: dense layers between MoE layers "
            "are not built (mlp_only_layers must be empty)"
        )
    experts = _int_key(hf, "num_experts", "num_local_experts")
    topk = _int_key(hf, "num_experts_per_tok")
    if not 1 <= topk <= experts:
        raise ValueError(f"num_experts_per_tok={topk} must be in [1, num_experts={experts}]")
    return MoESpec(
        num_experts=experts,
        topk=topk,
        ffn_hidden_size=_int_key(hf, "moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_ffn_hidden_size=int(hf.get("shared_expert_intermediate_size") or 0),
    )


def moe_config_kwargs(moe: MoESpec | None, model_cfg: Any, ep: int, *, transformer_engine: bool) -> dict:
    """``TransformerConfig`` keyword arguments for ``moe`` (``{}`` for a dense model).

    ``model_cfg`` is a ``ModelConfig`` (``moe_aux_loss_coeff``, ``moe_token_dispatcher``,
    ``moe_capacity_factor``). Raises ``ConfigError`` when the experts do not split over ``ep`` ranks
    or the dispatcher needs hardware this machine lacks.
    """
    if moe is None:
        return {}
    if moe.num_experts % ep:
        raise ConfigError(f"parallel.expert: {ep} ranks cannot split num_experts={moe.num_experts} evenly")
    if model_cfg.moe_token_dispatcher == "flex" and not torch.cuda.is_available():
        raise ConfigError("model.moe_token_dispatcher: 'flex' needs DeepEP/HybridEP on CUDA; use 'alltoall'")
    coeff = float(model_cfg.moe_aux_loss_coeff)
    kwargs: dict = dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
        moe_aux_loss_coeff=coeff,
        moe_token_dispatcher_type=model_cfg.moe_token_dispatcher,
        moe_expert_capacity_factor=model_cfg.moe_capacity_factor,
        moe_grouped_gemm=transformer_engine,
        # Inert until an action is set (megatron's RouterReplay): replaying the rollout's expert
        # choices needs no rebuild, see dapo_megatron.megatron.moe_replay.
        moe_enable_routing_replay=True,
    )
    if moe.shared_expert_ffn_hidden_size:
        kwargs["moe_shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
    return kwargs


def check_expert_tensor(moe: MoESpec | None, tp: int, etp: int) -> None:
    """Raise ``ConfigError`` when ``parallel.expert_tensor`` (resolved: ``etp``) cannot apply.

    A dense model has no routed experts, so an ETP other than ``tp`` (megatron's default, what
    ``parallel.expert_tensor: 0`` means) would be silently meaningless: refused. For a MoE model
    each expert's fc1 (gate and up, column-parallel) and fc2 (row-parallel) split
    ``moe_intermediate_size`` over the ``etp`` ranks, so it must divide evenly.
    """
    if moe is None:
        if etp != tp:
            raise ConfigError(
                f"parallel.expert_tensor: {etp} splits routed experts, but this model is dense (no num_experts "
                f"in its HF config); leave it 0 (same as parallel.tensor={tp})"
            )
        return
    if moe.ffn_hidden_size % etp:
        raise ConfigError(
            f"parallel.expert_tensor: {etp} ranks cannot split each expert's moe_intermediate_size="
            f"{moe.ffn_hidden_size} evenly"
        )


def mark_expert_params(chunks: list, topology: Any) -> None:
    """Make megatron reduce routed experts' gradients over the expert-data-parallel group whenever
    expert tensor parallelism differs from tensor parallelism.

    megatron-core 0.16 marks expert weights ``allreduce=False`` (reduce over the expert-DP group,
    optimizer and grad norm over the expert groups) only at expert parallelism > 1; at EP=1 they
    are treated as dense weights, reduced over the dense DP group. That group holds copies of the
    same shard only when ETP equals TP: at TP=1, ETP=2 it pairs the two halves of each expert, and
    averaging them corrupts the update (measured: updated experts off by the size of the update
    itself). Marking them as megatron does at EP > 1 makes DDP, the optimizer and the grad norm
    use the expert groups, which are right at every EP.
    """
    if topology.etp == topology.tp:
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".mlp.experts." in name:
                param.allreduce = False


def prepare_moe_build() -> None:
    """Run before building a MoE model's chunks: forget the routers of earlier builds in this process
    (megatron keeps every ``RouterReplay`` in a class-level list, in build order, and replay data is
    matched to that list by position), and make the dispatcher work without CUDA.

    Without CUDA: ``MoEAlltoAllTokenDispatcher.__init__`` creates ``torch.cuda.Stream()`` once per process (a

    class attribute) to overlap the token-count copy; without CUDA that constructor raises. The
    copy is synchronous on CPU, so an object with the stream methods it calls is enough; and the
    dispatcher's unequal gathers over the expert-TP group go through :mod:`moe_gloo`.
    """
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    RouterReplay.clear_global_router_replay_instances()
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16.1 imports te_general_gemm only when Transformer Engine imports, yet the
    # router's gating reads the name unguarded ("is not None"); without TE that is a NameError.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        return

    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CpuStream()
    # The split sizes reach torch's all_to_all_single, which wants a sequence of ints; megatron makes
    # them numpy only in its device-to-host copy, which it skips for tensors already on the CPU.
    token_dispatcher.maybe_move_tensor_to_cpu = _as_host_value
    # Expert tensor parallelism gathers unequal token counts over the expert-TP group; gloo needs help.
    moe_gloo.install()


def _as_host_value(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU stand-in for megatron's ``maybe_move_tensor_to_cpu``: numpy when asked, else unchanged."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


class _CpuStream:
    """Stands in for the dispatcher's CUDA stream; its events are already complete on CPU
    (``record_event`` returns an object whose ``synchronize`` the dispatcher calls)."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuStream:
        return self

"""Config sections of the actor: the model it is built from and its parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dapo_megatron.config_base import DTYPES, _check, _choice, _refuse
from dapo_megatron.config_rules import expert_layout_problem, expert_tensor_problem


@dataclass(frozen=True)
class ModelConfig:
    """What the actor is built from.

    Fields:
        hf_path: folder holding an HF ``config.json`` (and, for conversion, safetensors and
            tokenizer files). Empty means the caller builds the model from code (the demo does).
        load: Megatron dist checkpoint to start from (made by ``tools/convert_hf_to_megatron.py``
            or by a previous run). Empty means random initialisation.
        params_dtype: dtype of the trained parameters and activations.
        transformer_impl: ``local`` (megatron-core's torch layers, the CPU path),
            ``transformer_engine`` (GPU), or ``auto`` (TE when importable and CUDA is present).
        fp8: ``None`` (off), ``e4m3`` or ``hybrid`` (Transformer Engine FP8 formats).
        fp8_recipe: TE scaling recipe: ``delayed``, ``tensorwise``, ``blockwise`` or ``mxfp8``.
        recompute_granularity: activation recompute: ``None``, ``full`` or ``selective``.
        recompute_method: for ``full``: ``uniform`` or ``block``.
        recompute_num_layers: layers per recompute unit (``full`` only).
        seed: seed of parameter initialisation and dropout.
        moe_aux_loss_coeff: weight of megatron's load-balancing aux loss (MoE models; 0 = off). It is
            added once per optimizer update, whatever the number of micro-batches: megatron averages
            it over the update's micro-batches and DP ranks (logged as ``moe/aux_loss``).
        moe_token_dispatcher: how tokens reach their experts' ranks: ``alltoall`` (works on gloo and
            NCCL) or ``flex`` (DeepEP on CUDA). ``allgather`` is refused: megatron rejects it with
            the variable-length micro-batches this trainer packs.
        moe_capacity_factor: ``None`` (no token dropping) or the expert capacity as a multiple of the
            even share ``tokens * topk / num_experts``; tokens over capacity are dropped (counted in
            the ``moe/dropped_token_frac`` metric).
    """

    hf_path: str = ""
    load: str = ""
    params_dtype: str = "float32"
    transformer_impl: str = "auto"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    seed: int = 1234
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher: str = "alltoall"
    moe_capacity_factor: Optional[float] = None

    def __post_init__(self) -> None:
        _check(self.moe_aux_loss_coeff >= 0, "model.moe_aux_loss_coeff", "must be >= 0")
        _check(
            self.moe_token_dispatcher != "allgather",
            "model.moe_token_dispatcher",
            "'allgather' is not supported: megatron-core rejects it with variable-length micro-batches; use 'alltoall'",
        )
        _choice(self.moe_token_dispatcher, "model.moe_token_dispatcher", ("alltoall", "flex"))
        _check(
            self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
            "model.moe_capacity_factor",
            "must be null (no dropping) or > 0",
        )
        _choice(self.params_dtype, "model.params_dtype", DTYPES)
        _choice(self.transformer_impl, "model.transformer_impl", ("auto", "local", "transformer_engine"))
        _choice(self.fp8, "model.fp8", (None, "e4m3", "hybrid"))
        _choice(self.fp8_recipe, "model.fp8_recipe", ("delayed", "tensorwise", "blockwise", "mxfp8"))
        _choice(self.recompute_granularity, "model.recompute_granularity", (None, "full", "selective"))
        _choice(self.recompute_method, "model.recompute_method", ("uniform", "block"))
        _check(self.recompute_num_layers >= 1, "model.recompute_num_layers", "must be >= 1")
        _check(
            self.fp8 is None or self.transformer_impl != "local",
            "model.fp8",
            "FP8 needs Transformer Engine; set model.transformer_impl to 'transformer_engine' or 'auto'",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """Trainer parallel layout.

    Fields:
        tensor: tensor-parallel degree (TP).
        pipeline: pipeline-parallel degree (PP).
        virtual_pipeline: model chunks per pipeline rank (interleaved schedule); 1 means off.
        context: context-parallel degree (CP).
        expert: expert-parallel degree (EP), for MoE models.
        expert_tensor: expert-tensor-parallel degree (ETP), for MoE models: each routed expert's
            linears are split over this many ranks, independently of ``tensor`` (megatron lays the
            MoE layers out as ``tp-ep-dp-pp`` with ETP in the ``tp`` slot). ``0`` (default) means
            "same as ``tensor``", megatron's own default. ``expert_tensor * expert * pipeline``
            must divide the world size; a dense model refuses a value that differs from ``tensor``.
        sequence_parallel: Megatron sequence parallelism: norms, dropout and residuals hold ``T/tp``
            positions per TP rank. Needs ``tensor > 1`` and Transformer Engine layers (GPU):
            megatron-core's local (CPU) layer spec builds torch norms, which refuse it.
        world_size: trainer ranks, when known up front (``nodes * gpus_per_node``); 0 means taken
            from the launcher at start-up. When set, the layout is checked against it here.
        use_distributed_optimizer: shard optimizer state across data-parallel ranks.
        collective_timeout_s: seconds one collective (of the world or of megatron's groups) may
            wait before the process group gives up. Rank-0-only work (rollout, eval, engine
            start-up) is waited for on the rendezvous store, not in a collective, so this need not
            cover a rollout; it must cover the longest legitimate skew between ranks inside a
            collective: a checkpoint save of a large model to a shared file system, a weight push
            while engines load, the first NCCL connect of a big job. One hour does, and a rank that
            hangs longer still ends the job instead of burning the allocation.
    """

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: int = 0
    sequence_parallel: bool = False
    world_size: int = 0
    use_distributed_optimizer: bool = False
    collective_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        _check(self.collective_timeout_s > 0, "parallel.collective_timeout_s", "must be > 0 seconds")
        for name in ("tensor", "pipeline", "virtual_pipeline", "context", "expert"):
            _check(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        _check(
            self.virtual_pipeline == 1 or self.pipeline > 1,
            "parallel.virtual_pipeline",
            "an interleaved schedule needs parallel.pipeline > 1",
        )
        _check(self.expert_tensor >= 0, "parallel.expert_tensor", "must be >= 0 (0 = same as parallel.tensor)")
        _check(self.world_size >= 0, "parallel.world_size", "must be >= 0 (0 = from the launcher)")
        _check(
            not self.sequence_parallel or self.tensor > 1,
            "parallel.sequence_parallel",
            "splits each sequence over the tensor-parallel ranks, so it needs parallel.tensor > 1",
        )
        model_parallel = self.tensor * self.pipeline * self.context
        _check(
            self.world_size == 0 or self.world_size % model_parallel == 0,
            "parallel.world_size",
            f"{self.world_size} ranks cannot hold tensor*pipeline*context = "
            f"{self.tensor}*{self.pipeline}*{self.context} = {model_parallel}; "
            "the world size must be a multiple of it",
        )
        _refuse(expert_layout_problem(self.world_size, model_parallel, self.expert))
        etp = self.expert_tensor or self.tensor
        _refuse(expert_tensor_problem(self.world_size, etp, self.expert, self.pipeline))

"""The typed configuration tree: the single home of every default.

Every section is a frozen dataclass. Each field carries its documentation in the ``Field`` notes of
the section's docstring, and every value is checked when the object is built (``__post_init__``),
so an impossible setting fails before any process group, engine or file exists. Loading from YAML
and dotted overrides live in :mod:`dapo_megatron.config_io`.

Functions elsewhere take the sub-config they need (``cfg.algo``) or plain scalars, never the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dapo_megatron.config_rules import expert_layout_problem, non_finite_float, non_string_item


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the dotted key and what is allowed."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _refuse(problem: Optional[str]) -> None:
    """Raise a rule's problem line (``config_rules``) when there is one."""
    if problem:
        raise ConfigError(problem)


def _choice(value: object, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, allowed values are {', '.join(map(repr, allowed))}")


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DTYPES = ("float32", "bfloat16", "float16")


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

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class OverlongBufferConfig:
    """Soft overlong punishment (DAPO Eq. 13).

    Fields:
        enable: add the length penalty to the rule reward.
        len: buffer length L_cache in tokens; the penalty ramps from 0 at
            ``max_response_len - len`` to ``-penalty_factor`` at ``max_response_len``.
        penalty_factor: scale of the penalty (1.0 in the paper).
    """

    enable: bool = True
    len: int = 4096
    penalty_factor: float = 1.0

    def __post_init__(self) -> None:
        _check(self.len >= 1, "algo.overlong_buffer.len", "must be >= 1 token")
        _check(self.penalty_factor >= 0, "algo.overlong_buffer.penalty_factor", "must be >= 0")


@dataclass(frozen=True)
class FilterGroupsConfig:
    """Dynamic sampling: keep only groups whose metric varies.

    Fields:
        enable: turn dynamic sampling on.
        metric: per-sample value that must vary within a group: ``acc`` (correctness; the paper's
            choice), ``score`` (rule reward before shaping) or ``seq_reward`` (shaped reward).
        max_num_gen_batches: generation rounds allowed per step; 0 means unlimited.
        on_exhausted: when the bound is hit: ``error`` (stop with a message) or ``pad`` (fill the
            batch with zero-variance groups, which contribute zero advantage).
    """

    enable: bool = True
    metric: str = "acc"
    max_num_gen_batches: int = 10
    on_exhausted: str = "error"

    def __post_init__(self) -> None:
        _choice(self.metric, "algo.filter_groups.metric", ("acc", "score", "seq_reward"))
        _check(self.max_num_gen_batches >= 0, "algo.filter_groups.max_num_gen_batches", "must be >= 0 (0 = unlimited)")
        _choice(self.on_exhausted, "algo.filter_groups.on_exhausted", ("error", "pad"))


@dataclass(frozen=True)
class TISConfig:
    """Truncated importance sampling between the rollout engine's and the trainer's policy.

    Fields:
        enable: multiply the per-token loss by ``min(exp(old_lp - rollout_lp), cap)``.
        cap: upper bound of the weight.
    """

    enable: bool = False
    cap: float = 2.0

    def __post_init__(self) -> None:
        _check(self.cap > 0, "algo.tis.cap", "must be > 0")


@dataclass(frozen=True)
class AlgoConfig:
    """The DAPO objective.

    Fields:
        clip_ratio_low: epsilon_low of the decoupled clip (ratio floor is 1 - eps_low).
        clip_ratio_high: epsilon_high (Clip-Higher; ratio ceiling is 1 + eps_high).
        clip_ratio_c: dual-clip bound c for negative advantages (> 1), or None for off.
        log_ratio_clamp: |logp - old_logp| is clamped to this before ``exp``.
        loss_agg_mode: one of ``token-mean`` (DAPO), ``seq-mean-token-mean`` (GRPO),
            ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``.
        norm_adv_by_std: divide group-centred rewards by the group std (GRPO); False is Dr. GRPO.
        adv_eps: added to the std in the advantage denominator.
        overlong_filter: give truncated samples loss mask 0.
        use_rollout_logprobs: use the engine's logprobs as old logprobs instead of recomputing.
        entropy_coeff: weight of an entropy bonus (0 = off, DAPO default).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: Optional[float] = None
    log_ratio_clamp: float = 20.0
    loss_agg_mode: str = "token-mean"
    norm_adv_by_std: bool = True
    adv_eps: float = 1e-6
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    overlong_filter: bool = False
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    tis: TISConfig = field(default_factory=TISConfig)
    use_rollout_logprobs: bool = False
    entropy_coeff: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.clip_ratio_low < 1, "algo.clip_ratio_low", f"must be in [0, 1), got {self.clip_ratio_low}")
        _check(self.clip_ratio_high >= 0, "algo.clip_ratio_high", f"must be >= 0, got {self.clip_ratio_high}")
        _check(
            self.clip_ratio_c is None or self.clip_ratio_c > 1,
            "algo.clip_ratio_c",
            f"dual-clip bound must be > 1 or null, got {self.clip_ratio_c}",
        )
        _check(self.log_ratio_clamp > 0, "algo.log_ratio_clamp", "must be > 0")
        _choice(self.loss_agg_mode, "algo.loss_agg_mode", LOSS_AGG_MODES)
        _check(self.adv_eps > 0, "algo.adv_eps", "must be > 0")


@dataclass(frozen=True)
class RolloutConfig:
    """Generation: engines, sampling and batch sizes.

    Fields:
        engine: ``embedded`` (transformers, the CPU default), ``sglang`` or ``vllm``.
        mode: ``colocated`` (engines time-share the trainer devices) or ``disaggregated``.
        num_engines: engine instances (servers) in disaggregated mode.
        engine_tensor_parallel: TP degree inside each engine.
        prompts_per_step: valid prompt groups per training step (DAPO: 512).
        n_samples_per_prompt: responses per prompt, the group size G (DAPO: 16).
        gen_prompts_per_round: prompts of a step's first generation round (DAPO: 3 x prompts_per_step);
            refill rounds are sized from the observed keep rate, at most this many.
        max_prompt_len: prompts longer than this (in tokens) are rejected.
        max_response_len: L_max, the generation cap in tokens.
        temperature / top_p / top_k: sampling; ``top_k=-1`` disables top-k.
        max_concurrency: in-flight prompt groups per server worker (an engine fronting several
            workers, like SGLang behind its router, takes this times its live workers).
        request_timeout_s: a request taking longer fails and is retried on another engine.
        max_retries: retries of a failed request before the step fails.
        keep_surplus: keep completed surplus groups for the next step instead of discarding them.
        seed: base seed of sampling.
        router_port / engine_base_port: ports of sglang-router and the first engine server.
        mem_fraction_static: SGLang's static memory fraction per engine.
        sglang_python: the Python interpreter with SGLang installed, for the servers this run starts
            (local fleet and ``dapo-megatron engines``); "" means this interpreter. CPU machines build
            one with ``tools/sglang_env.sh`` (``.venv-sglang/bin/python``).
        sglang_device: ``auto`` (CUDA when visible, else CPU), ``cuda`` or ``cpu``.
        sglang_max_total_tokens: KV-pool size in tokens per server; 0 lets SGLang size it on a GPU
            (on CPU, 0 means 16384).
        server_start_timeout_s: how long the servers may take to load before the run fails.
        weight_check_max_gap: the first step's check that the trainer's weights reached the engines:
            the mean |trainer log-prob - engine log-prob| of the first batch must not exceed this.
        offload_trainer: colocated mode only: while the engines hold the devices (from the weight
            sync to the end of generation), the trainer's parameters, Adam state and gradients wait
            in host memory (pinned on CUDA) and ``empty_cache`` returns their memory; they come back
            before the old-log-prob pass. Costs host RAM (about params + optimizer state per rank)
            and two PCIe copies per step. Off by default for now: with SGLang engines, a checkpoint
            step releases the engines right after a weight sync, and SGLang 0.5.23 refuses that
            (its scheduler asserts it is idle and exits); the embedded engine is tested with it on.
    """

    engine: str = "embedded"
    mode: str = "colocated"
    num_engines: int = 1
    engine_tensor_parallel: int = 1
    prompts_per_step: int = 512
    n_samples_per_prompt: int = 16
    gen_prompts_per_round: int = 1536
    max_prompt_len: int = 2048
    max_response_len: int = 20480
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_concurrency: int = 64
    request_timeout_s: float = 3600.0
    max_retries: int = 3
    keep_surplus: bool = False
    seed: int = 0
    router_port: int = 30000
    engine_base_port: int = 30010
    mem_fraction_static: float = 0.7
    sglang_python: str = ""
    sglang_device: str = "auto"
    sglang_max_total_tokens: int = 0
    server_start_timeout_s: float = 900.0
    weight_check_max_gap: float = 0.05
    offload_trainer: bool = False

    def __post_init__(self) -> None:
        _choice(self.engine, "rollout.engine", ("embedded", "sglang", "vllm"))
        _choice(self.sglang_device, "rollout.sglang_device", ("auto", "cuda", "cpu"))
        _check(self.sglang_max_total_tokens >= 0, "rollout.sglang_max_total_tokens", "must be >= 0 (0: automatic)")
        _check(self.server_start_timeout_s > 0, "rollout.server_start_timeout_s", "must be > 0")
        _check(self.weight_check_max_gap > 0, "rollout.weight_check_max_gap", "must be > 0")
        _choice(self.mode, "rollout.mode", ("colocated", "disaggregated"))
        for name in (
            "num_engines",
            "engine_tensor_parallel",
            "prompts_per_step",
            "n_samples_per_prompt",
            "max_prompt_len",
            "max_response_len",
            "max_concurrency",
        ):
            _check(getattr(self, name) >= 1, f"rollout.{name}", "must be >= 1")
        _check(self.gen_prompts_per_round >= 1, "rollout.gen_prompts_per_round", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0 (greedy decoding is not a policy)")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1")
        _check(self.request_timeout_s > 0, "rollout.request_timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "rollout.max_retries", "must be >= 0")
        _check(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", "must be in (0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron-core's optimizer).

    Fields:
        lr: peak learning rate (DAPO: 1e-6).
        min_lr: floor of the decay schedule.
        lr_warmup_steps: linear warm-up length in **rollout steps** (DAPO: 20).
        lr_decay_style: ``constant``, ``linear`` or ``cosine`` after warm-up.
        weight_decay: AdamW decoupled weight decay (DAPO: 0.1).
        adam_beta1 / adam_beta2 / adam_eps: Adam moments.
        clip_grad: global gradient-norm clip (DAPO: 1.0); 0 disables it.
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 20
    lr_decay_style: str = "constant"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        _check(self.lr_warmup_steps >= 0, "optim.lr_warmup_steps", "must be >= 0")
        _choice(self.lr_decay_style, "optim.lr_decay_style", ("constant", "linear", "cosine"))
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.adam_beta1 < 1, "optim.adam_beta1", "must be in [0, 1)")
        _check(0 <= self.adam_beta2 < 1, "optim.adam_beta2", "must be in [0, 1)")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class TrainConfig:
    """How one rollout step becomes optimizer updates.

    Fields:
        ppo_mini_batch_size: prompts per optimizer update (DAPO: 32, i.e. 512 responses), so a
            step of ``rollout.prompts_per_step`` prompts makes ``prompts_per_step / this`` updates.
        ppo_epochs: passes over the step's data.
        micro_batch_size: sequences per forward/backward micro-batch (when not packing by tokens).
        max_tokens_per_microbatch: token budget per micro-batch for dynamic batching; 0 = off.
        logprob_chunk_size: tokens per chunk in the vocab-parallel log-prob/entropy computation.
        total_steps: rollout steps to run.
    """

    ppo_mini_batch_size: int = 32
    ppo_epochs: int = 1
    micro_batch_size: int = 1
    max_tokens_per_microbatch: int = 0
    logprob_chunk_size: int = 1024
    total_steps: int = 100

    def __post_init__(self) -> None:
        for name in ("ppo_mini_batch_size", "ppo_epochs", "micro_batch_size", "logprob_chunk_size", "total_steps"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _check(self.max_tokens_per_microbatch >= 0, "train.max_tokens_per_microbatch", "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class DataConfig:
    """Prompt datasets.

    Fields:
        train_files: parquet or jsonl files in the DAPO-Math-17k schema.
        eval_files: evaluation sets in the same schema (e.g. AIME-2024, 30 x 32 rows).
        dedup: drop repeated problems (the released DAPO-Math-17k repeats each ~100x).
        template: ``dapo`` wraps the raw problem in the DAPO prompt template; ``none`` uses the
            prompt's content as it is.
        apply_chat_template: wrap the prompt with the tokenizer's chat template.
        skip_malformed: skip and count malformed rows instead of raising.
        shuffle: shuffle each epoch (seeded, resumable).
        seed: sampler seed.
    """

    train_files: tuple = ()
    eval_files: tuple = ()
    dedup: bool = False
    template: str = "dapo"
    apply_chat_template: bool = True
    skip_malformed: bool = False
    shuffle: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        _choice(self.template, "data.template", ("dapo", "none"))
        _refuse(non_string_item(self.train_files, "data.train_files"))
        _refuse(non_string_item(self.eval_files, "data.eval_files"))


@dataclass(frozen=True)
class RewardConfig:
    """Scoring.

    Fields:
        name: ``dapo_math`` (the reference rule scorer) or ``math_verify`` (symbolic equivalence).
        timeout_s: bound on scoring one response.
    """

    name: str = "dapo_math"
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _choice(self.name, "reward.name", ("dapo_math", "math_verify"))
        _check(self.timeout_s > 0, "reward.timeout_s", "must be > 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation sampling (DAPO's AIME protocol: temperature 1.0, top-p 0.7, 20480 tokens).

    Fields:
        temperature / top_p: sampling of evaluation responses.
        n_samples: responses per evaluation row (k of avg@k on top of any repeated rows).
        max_response_len: generation cap during evaluation.
    """

    temperature: float = 1.0
    top_p: float = 0.7
    n_samples: int = 1
    max_response_len: int = 20480

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(self.n_samples >= 1, "eval.n_samples", "must be >= 1")
        _check(self.max_response_len >= 1, "eval.max_response_len", "must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Run directory, checkpoints, evaluation and logging.

    Fields:
        dir: run directory (resolved config, metrics.jsonl, checkpoints, logs).
        name: run name for loggers.
        save_every: checkpoint every N steps; 0 = only at the end.
        keep_checkpoints: newest checkpoints kept on disk.
        eval_every: evaluate every N steps; 0 = off.
        resume: resume from the newest checkpoint in ``dir`` when one exists.
        wandb: log to Weights & Biases.
        wandb_project: W&B project.
        wandb_mode: ``online``, ``offline`` or ``disabled``.
        dump_rollouts: write each step's rollouts (the kept groups the actor trains on) to
            ``dir/rollouts/step_N.jsonl``.
        replay_rollouts: a ``rollouts/`` folder dumped by an earlier run: each step trains on its
            ``step_N.jsonl`` instead of generating. No engine is started; weight sync and eval are
            skipped. With the same initial weights this reproduces the dumped run's updates exactly,
            which isolates the trainer from the engines when debugging.
    """

    dir: str = "runs/default"
    name: str = "dapo"
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    resume: bool = True
    wandb: bool = False
    wandb_project: str = "dapo_megatron"
    wandb_mode: str = "offline"
    dump_rollouts: bool = False
    replay_rollouts: str = ""

    def __post_init__(self) -> None:
        _check(self.save_every >= 0, "run.save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        _check(self.eval_every >= 0, "run.eval_every", "must be >= 0")
        _choice(self.wandb_mode, "run.wandb_mode", ("online", "offline", "disabled"))


@dataclass(frozen=True)
class DemoConfig:
    """The embedded demo (``dapo-megatron demo``): its synthetic task and supervised warm-up.

    Fields:
        max_operand: operands are drawn from ``0..max_operand``.
        ops: operators of the arithmetic problems (``+``, ``-``, ``*``).
        num_train / num_eval: distinct training and held-out problems (disjoint sets).
        sft_steps / sft_lr / sft_batch_size: the warm-up: Adam steps of token-mean cross-entropy on
            the reference answers, with its own learning rate (DAPO then uses ``optim.lr``).
        hidden_size / num_layers: shape of the tiny Qwen2 model built from code.
    """

    max_operand: int = 29
    ops: tuple = ("+",)
    num_train: int = 600
    num_eval: int = 200
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    hidden_size: int = 128
    num_layers: int = 2

    def __post_init__(self) -> None:
        _check(self.max_operand >= 1, "demo.max_operand", "must be >= 1")
        _check(bool(self.ops) and set(self.ops) <= {"+", "-", "*"}, "demo.ops", "must be a non-empty subset of + - *")
        for name in ("num_train", "num_eval", "sft_batch_size", "hidden_size", "num_layers"):
            _check(getattr(self, name) >= 1, f"demo.{name}", "must be >= 1")
        _check(self.sft_steps >= 0, "demo.sft_steps", "must be >= 0")
        _check(self.sft_lr > 0, "demo.sft_lr", "must be > 0")
        _check(self.hidden_size % 32 == 0, "demo.hidden_size", "must be a multiple of 32 (head_dim 32)")
        problems = (self.max_operand + 1) ** 2 * len(self.ops)
        _check(
            self.num_train + self.num_eval <= problems,
            "demo.num_train",
            f"num_train + num_eval = {self.num_train + self.num_eval} but only {problems} distinct problems exist",
        )


@dataclass(frozen=True)
class Config:
    """The root of the tree. Cross-section rules are checked here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        _refuse(non_finite_float(self))  # the whole tree, also when sections were built in code
        buf = self.algo.overlong_buffer
        _check(
            not buf.enable or buf.len < self.rollout.max_response_len,
            "algo.overlong_buffer.len",
            f"buffer of {buf.len} tokens must be shorter than rollout.max_response_len={self.rollout.max_response_len}",
        )
        _check(
            self.rollout.prompts_per_step % self.train.ppo_mini_batch_size == 0,
            "train.ppo_mini_batch_size",
            f"{self.train.ppo_mini_batch_size} must divide rollout.prompts_per_step={self.rollout.prompts_per_step}",
        )
        _check(
            self.model.fp8 is None or self.model.params_dtype == "bfloat16",
            "model.fp8",
            "FP8 training keeps master weights in bfloat16; set model.params_dtype=bfloat16",
        )
        _check(
            not self.parallel.sequence_parallel or self.model.transformer_impl != "local",
            "parallel.sequence_parallel",
            "megatron-core's local layers (model.transformer_impl='local') use torch norms, which do not "
            "support sequence parallelism; use Transformer Engine (GPU) or turn sequence_parallel off",
        )

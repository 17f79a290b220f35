"""The typed configuration tree: the single home of every default.

Every section is a frozen dataclass. Each field carries its documentation in the ``Field`` notes of
the section's docstring, and every value is checked when the object is built (``__post_init__``),
so an impossible setting fails before any process group, engine or file exists. Loading from YAML
and dotted overrides live in :mod:`dapo_megatron.config_io`.

Functions elsewhere take the sub-config they need (``cfg.algo``) or plain scalars, never the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dapo_megatron.config_algo import AlgoConfig, FilterGroupsConfig, OverlongBufferConfig, TISConfig
from dapo_megatron.config_base import DTYPES, LOSS_AGG_MODES, ConfigError, _check, _choice, _refuse
from dapo_megatron.config_model import ModelConfig, ParallelConfig
from dapo_megatron.config_rollout import RolloutConfig
from dapo_megatron.config_rules import non_finite_float, non_string_item, routing_replay_problem

__all__ = [
    "AlgoConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "DTYPES",
    "EvalConfig",
    "FilterGroupsConfig",
    "LOSS_AGG_MODES",
    "ModelConfig",
    "OptimConfig",
    "OverlongBufferConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TISConfig",
    "TrainConfig",
]  # the sections live in config_*.py; this module is the one to import


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
        max_concurrency: evaluation requests in flight per engine; 0 (default) submits the whole set
            at once, which the embedded engine decodes as one batch (SGLang/vLLM queue it themselves).
    """

    temperature: float = 1.0
    top_p: float = 0.7
    n_samples: int = 1
    max_response_len: int = 20480
    max_concurrency: int = 0

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(self.n_samples >= 1, "eval.n_samples", "must be >= 1")
        _check(self.max_response_len >= 1, "eval.max_response_len", "must be >= 1")
        _check(self.max_concurrency >= 0, "eval.max_concurrency", "must be >= 0 (0: the whole set at once)")


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
        chain: operands per problem. 2: one operation, answered ``"Answer: <n>"`` (about 11 tokens).
            3 or more: a sum (``ops`` must be ``["+"]``) that the warm-up teaches to work out left to
            right, ``"12+7=19 19+5=24 Answer: 24"`` (about 9 tokens per step): responses long enough
            for overlong shaping and clip-higher to act on (raise ``rollout.max_response_len``).
        num_train / num_eval: distinct training and held-out problems (disjoint sets).
        sft_steps / sft_lr / sft_batch_size: the warm-up: Adam steps of token-mean cross-entropy on
            the reference answers, with its own learning rate (DAPO then uses ``optim.lr``).
        hidden_size / num_layers: shape of the tiny model built from code.
        model_type: the tiny model's HF architecture: ``qwen2`` (dense) or ``qwen3_moe`` (every
            layer's MLP a mixture of experts, megatron's MoE path end to end).
        num_experts / moe_topk / moe_intermediate_size: ``qwen3_moe`` only: routed experts per
            layer, experts each token goes to (``moe_topk <= num_experts``) and one expert's width.
    """

    max_operand: int = 29
    ops: tuple = ("+",)
    chain: int = 2
    num_train: int = 600
    num_eval: int = 200
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    hidden_size: int = 128
    num_layers: int = 2
    model_type: str = "qwen2"
    num_experts: int = 8
    moe_topk: int = 2
    moe_intermediate_size: int = 64

    def __post_init__(self) -> None:
        _check(self.max_operand >= 1, "demo.max_operand", "must be >= 1")
        _choice(self.model_type, "demo.model_type", ("qwen2", "qwen3_moe"))
        _check(self.num_experts >= 1, "demo.num_experts", "must be >= 1")
        experts = self.num_experts
        _check(1 <= self.moe_topk <= experts, "demo.moe_topk", f"must be in [1, num_experts={experts}]")
        _check(bool(self.ops) and set(self.ops) <= {"+", "-", "*"}, "demo.ops", "must be a non-empty subset of + - *")
        for name in ("num_train", "num_eval", "sft_batch_size", "hidden_size", "num_layers", "moe_intermediate_size"):
            _check(getattr(self, name) >= 1, f"demo.{name}", "must be >= 1")
        _check(self.sft_steps >= 0, "demo.sft_steps", "must be >= 0")
        _check(self.sft_lr > 0, "demo.sft_lr", "must be > 0")
        _check(self.hidden_size % 32 == 0, "demo.hidden_size", "must be a multiple of 32 (head_dim 32)")
        _check(self.chain >= 2, "demo.chain", "must be >= 2 (operands per problem)")
        _check(self.chain == 2 or tuple(self.ops) == ("+",), "demo.chain", 'above 2 needs demo.ops=["+"] (a sum)')
        problems = (self.max_operand + 1) ** self.chain * (len(self.ops) if self.chain == 2 else 1)
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
        _refuse(routing_replay_problem(self.algo.routing_replay, self.rollout.engine, self.run.replay_rollouts))
        _check(
            not self.parallel.sequence_parallel or self.model.transformer_impl != "local",
            "parallel.sequence_parallel",
            "megatron-core's local layers (model.transformer_impl='local') use torch norms, which do not "
            "support sequence parallelism; use Transformer Engine (GPU) or turn sequence_parallel off",
        )

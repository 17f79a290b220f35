"""Config sections of the DAPO objective: overlong shaping, dynamic sampling, TIS and the loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dapo_megatron.config_base import LOSS_AGG_MODES, _check, _choice


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
    """Importance sampling between the rollout engine's (behaviour) and the trainer's (proximal) policy.

    The decoupled objective: the ratio is clipped against the old (proximal) log-probs and each
    token's loss is weighted by ``w = pi_old / pi_rollout``, bounded as ``mode`` says
    (``dapo_megatron/algo/offpolicy.py``). The defaults are token-level truncated IS.

    Fields:
        enable: multiply the per-token loss by the weight (off: no correction).
        cap: upper bound of the weight in ``truncate`` mode (``min(w, cap)``).
        level: what one weight covers: ``token`` (``exp(old_lp - rollout_lp)`` per token),
            ``sequence`` (``exp`` of the sum over the response, on every token of it) or
            ``geometric`` (``exp`` of the mean over the response: the geometric mean of the
            token ratios).
        mode: ``truncate`` (``min(w, cap)``) or ``mask`` (a weight outside ``[mask_low,
            mask_high]`` zeroes the token, or the whole sequence at sequence level).
        mask_low: lower bound of a kept weight in ``mask`` mode, in ``[0, 1)``.
        mask_high: upper bound of a kept weight in ``mask`` mode, ``> 1``.
    """

    enable: bool = False
    cap: float = 2.0
    level: str = "token"
    mode: str = "truncate"
    mask_low: float = 0.5
    mask_high: float = 2.0

    def __post_init__(self) -> None:
        _check(self.cap > 0, "algo.tis.cap", f"must be > 0, got {self.cap}")
        _choice(self.level, "algo.tis.level", ("token", "sequence", "geometric"))
        _choice(self.mode, "algo.tis.mode", ("truncate", "mask"))
        _check(0 <= self.mask_low < 1, "algo.tis.mask_low", f"must be in [0, 1), got {self.mask_low}")
        _check(self.mask_high > 1, "algo.tis.mask_high", f"must be > 1, got {self.mask_high}")


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
        routing_replay: MoE models: ``none`` (the trainer's routers choose experts) or ``rollout``
            (R3: the engines return the experts each token went to, and the trainer's forwards --
            old-log-prob recompute and training -- route every token to those experts; the
            router's probabilities still come from the trainer, so it still learns). Needs a MoE
            model, an engine that returns routing (embedded; SGLang), no full recompute.
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
    routing_replay: str = "none"

    def __post_init__(self) -> None:
        _choice(self.routing_replay, "algo.routing_replay", ("none", "rollout"))
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

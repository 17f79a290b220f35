"""The metric keys the training loop emits and the plots read: one spelling, shared by both.

Keys are ``section/name``. Times are seconds (suffix ``_s``), ratios are in [0, 1], lengths are in
tokens. The loop should log through these constants, never through string literals, so a renamed
metric breaks loudly in one place instead of silently vanishing from a chart.
"""

from __future__ import annotations

# Rewards (per step, over every response of the step's training batch).
REWARD_MEAN = "reward/mean"  # mean shaped sequence reward
REWARD_ACC = "reward/acc"  # fraction of responses judged correct

# Actor update (averaged over the step's optimizer updates).
ACTOR_ENTROPY = "actor/entropy"  # mean per-token entropy of the policy on response tokens (nats)
ACTOR_CLIP_FRAC_HIGH = "actor/clip_frac_high"  # tokens with A > 0 clipped at 1 + eps_high
ACTOR_CLIP_FRAC_LOW = "actor/clip_frac_low"  # tokens with A < 0 clipped at 1 - eps_low
ACTOR_APPROX_KL = "actor/approx_kl"  # mean (old_logp - logp) over response tokens
ACTOR_GRAD_NORM = "actor/grad_norm"  # global gradient norm before clipping

# Responses.
RESPONSE_LEN_MEAN = "response/len_mean"  # tokens
RESPONSE_LEN_MAX = "response/len_max"  # tokens
RESPONSE_TRUNCATION_RATE = "response/truncation_rate"  # fraction that hit max_response_len

# Dynamic sampling.
DS_KEPT_RATIO = "ds/kept_ratio"  # kept groups / generated groups over the step's rounds
DS_ROUNDS = "ds/rounds"  # generation rounds the step needed

# Off-policy correction (only with algo.tis.enable; MegatronActor.train_step reports them under these
# keys). Token-weighted over the step's response tokens; "raw" is pi_old / pi_rollout before the cap
# or the mask, "applied" is what multiplies the loss.
TIS_WEIGHT_MEAN = "tis/weight_mean"  # mean applied weight (masked tokens count as 0)
TIS_WEIGHT_MAX = "tis/weight_max"  # largest raw weight
TIS_WEIGHT_MIN = "tis/weight_min"  # smallest raw weight
TIS_CAPPED_FRAC = "tis/capped_frac"  # tokens whose weight was cut to algo.tis.cap (truncate mode)
TIS_MASKED_FRAC = "tis/masked_frac"  # tokens zeroed by [mask_low, mask_high] (mask mode)
TIS_KEYS = (TIS_WEIGHT_MEAN, TIS_WEIGHT_MAX, TIS_WEIGHT_MIN, TIS_CAPPED_FRAC, TIS_MASKED_FRAC)

# Also ``tis/hist_<lo>_<hi>``: share of tokens whose raw weight lies in ``[lo, hi)`` (``%g`` numbers,
# the buckets of ``algo.offpolicy.hist_edges``; spelled by ``algo.offpolicy.hist_key``).


# Staleness of an asynchronous step's samples (algo.staleness.StalenessHistogram.metrics()).
STALENESS_MAX = "staleness/max"  # versions between the oldest item and the trained policy
STALENESS_MEAN = "staleness/mean"
# Also ``staleness/count_<lag>``: items generated ``lag`` versions before the trained policy
# (spelled by ``algo.staleness.count_key``).


# Mixture of experts (MoE models: megatron.moe_stats, through MegatronActor.train_step).
MOE_EXPERT_LOAD_MAX = "moe/expert_load_max"  # largest share of a layer's kept token->expert assignments (1/E: balanced)
MOE_EXPERT_LOAD_MIN = "moe/expert_load_min"  # smallest such share
MOE_DROPPED_TOKEN_FRAC = "moe/dropped_token_frac"  # assignments dropped by model.moe_capacity_factor / assignments
MOE_AUX_LOSS = "moe/aux_loss"  # megatron's load-balancing loss (1.0: balanced); with model.moe_aux_loss_coeff > 0
MOE_KEYS = (MOE_EXPERT_LOAD_MAX, MOE_EXPERT_LOAD_MIN, MOE_DROPPED_TOKEN_FRAC, MOE_AUX_LOSS)

# Evaluation (logged only on evaluation steps).
EVAL_ACC = "eval/acc"

# Phase times, as produced by PhaseTimer.metrics().
PHASES = ("generate", "reward", "logprob", "train", "sync")


def time_key(phase: str) -> str:
    """Metric key of a phase's wall time: ``time/<phase>_s``."""
    return f"time/{phase}_s"


TIME_GENERATE = time_key("generate")
TIME_REWARD = time_key("reward")
TIME_LOGPROB = time_key("logprob")
TIME_TRAIN = time_key("train")
TIME_SYNC = time_key("sync")
TIME_KEYS = tuple(time_key(p) for p in PHASES)
TIME_HEAP_TRIM = time_key("heap_trim")  # returning the step's free heap pages to the OS (controller/heap.py)

ALL_KEYS = (
    REWARD_MEAN,
    REWARD_ACC,
    ACTOR_ENTROPY,
    RESPONSE_LEN_MEAN,
    RESPONSE_LEN_MAX,
    RESPONSE_TRUNCATION_RATE,
    DS_KEPT_RATIO,
    DS_ROUNDS,
    ACTOR_CLIP_FRAC_HIGH,
    ACTOR_CLIP_FRAC_LOW,
    ACTOR_APPROX_KL,
    ACTOR_GRAD_NORM,
    *TIME_KEYS,
    TIME_HEAP_TRIM,
    EVAL_ACC,
)

# What the one-line console summary shows, in this order, when present.
CONSOLE_KEYS = (
    REWARD_ACC,
    REWARD_MEAN,
    ACTOR_ENTROPY,
    RESPONSE_LEN_MEAN,
    DS_KEPT_RATIO,
    ACTOR_CLIP_FRAC_HIGH,
    ACTOR_GRAD_NORM,
    EVAL_ACC,
    *TIME_KEYS,
)

"""Off-policy correction of the decoupled objective: importance weights pi_prox / pi_behav.

With asynchronous rollouts (or a rollout engine whose numerics differ from the trainer's) three
policies meet in one token's loss: the behaviour policy that sampled it (the engine's
``rollout_logprobs``), the proximal policy the trainer recomputes (``old_logprobs``, the clip
anchor of :func:`~dapo_megatron.algo.policy_loss.policy_loss`) and the current policy. The
decoupled objective clips ``pi_theta / pi_prox`` as usual and multiplies each token's loss by the
detached weight ``w = pi_prox / pi_behav`` computed here.

Levels (what one weight covers), with ``d_t = old_t - rollout_t`` on response tokens:

- ``token``: ``w_t = exp(d_t)``;
- ``sequence``: ``w_i = exp(sum_t d_t)`` over the row's response, applied to each of its tokens;
- ``geometric``: ``w_i = exp(mean_t d_t)`` (the per-sequence geometric mean of the token ratios).

Modes (how a weight is bounded): ``truncate`` gives ``min(w, cap)``; ``mask`` gives ``w`` when
``lower <= w <= upper`` and 0 otherwise (the token, or the whole sequence, is dropped).

Every log-weight is clamped to ``+-LOG_WEIGHT_CLAMP`` before ``exp``, so no weight or statistic is
inf or nan for finite inputs, even when a long sequence sums to a huge log-ratio. Each row must
hold a whole sequence (the actor's micro-batches do). Shapes: ``[B, T]`` target-aligned.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import Tensor

IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
#: exp(80) ~ 5.5e34 and exp(-80) ~ 1.8e-35 are normal float32 numbers: no overflow, no denormals.
LOG_WEIGHT_CLAMP = 80.0
#: Above every weight, also after float32 rounding of ``exp``: the neutral element of ``weight_min``.
WEIGHT_CEIL = math.exp(LOG_WEIGHT_CLAMP + 1.0)
#: Inner edges of the weight histogram; the configured bounds are merged in (:func:`hist_edges`).
BASE_HIST_EDGES = (0.5, 0.8, 1.0, 1.25, 2.0)


def hist_edges(mode: str, *, cap: float, lower: float, upper: float) -> Tuple[float, ...]:
    """Bucket edges ``(0, e_1, ..., e_n, inf)``: the base edges plus the bounds ``mode`` uses (``cap``
    for ``truncate``, ``lower`` and ``upper`` for ``mask``), sorted, without duplicates. A pure
    function of the config, so every rank uses the same buckets and their counts can be summed.
    Bucket ``k`` is ``[edges[k], edges[k+1])``."""
    bounds = (cap,) if mode == "truncate" else (lower, upper)
    inner = sorted({float(e) for e in (*BASE_HIST_EDGES, *bounds) if 0.0 < e < math.inf})
    return (0.0, *inner, math.inf)


def hist_key(lo: float, hi: float) -> str:
    """Stat key of the bucket ``[lo, hi)``: ``hist_<lo>_<hi>`` with ``%g`` numbers (``hist_2_inf``)."""
    return f"hist_{lo:g}_{hi:g}"


def is_stat_keys(edges: Tuple[float, ...]) -> Tuple[str, ...]:
    """The summed stat keys of :func:`offpolicy_weights` for ``edges``, in a fixed order (the wire
    format of a cross-rank reduction). The peaks ``weight_max`` / ``weight_min`` are not in it."""
    buckets = tuple(hist_key(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]))
    return ("weight_sum", "capped_sum", "masked_sum", *buckets)


def _log_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, level: str) -> Tensor:
    """``[B, T]`` float32 log-weights (0 outside ``mask``), clamped to ``+-LOG_WEIGHT_CLAMP``."""
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    # Zero the padding first: it may hold -inf log-probs, and inf - inf would be nan.
    diff = torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), zero)
    if level == "token":
        log_w = diff
    else:
        row = diff.sum(dim=-1, keepdim=True)
        if level == "geometric":
            row = row / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        log_w = row.expand_as(diff)
    return torch.where(mask, log_w.clamp(-LOG_WEIGHT_CLAMP, LOG_WEIGHT_CLAMP), zero)


def offpolicy_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    lower: float = 0.5,
    upper: float = 2.0,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Detached IS weights ``[B, T]`` (float32, 0 outside ``loss_mask``) and masked-sum statistics.

    ``cap`` is used by ``truncate``; ``lower``/``upper`` by ``mask``. Stats are detached 0-dim
    float32 tensors over the response tokens, counted per token (a sequence-level weight counts
    once for each of its tokens), to be summed over micro-batches and ranks and divided by the
    summed token count: ``weight_sum`` (of the applied weights, 0 for masked tokens),
    ``capped_sum`` (tokens whose weight was cut to ``cap``), ``masked_sum`` (tokens zeroed by the
    mask), ``hist_<lo>_<hi>`` (tokens whose *raw* weight lies in ``[lo, hi)``, the buckets of
    :func:`hist_edges` of the bounds in use) and the peaks of the raw weight, ``weight_max``
    (0 with no tokens) and ``weight_min`` (``WEIGHT_CEIL`` with no tokens: neutral for a min).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"level: got {level!r}, allowed values are {', '.join(IS_LEVELS)}")
    if mode not in IS_MODES:
        raise ValueError(f"mode: got {mode!r}, allowed values are {', '.join(IS_MODES)}")
    if mode == "truncate" and not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if mode == "mask" and not 0 <= lower < upper:
        raise ValueError(f"mask bounds must satisfy 0 <= lower < upper, got lower={lower}, upper={upper}")
    with torch.no_grad():
        mask = loss_mask != 0
        raw = torch.exp(_log_weights(old_logprobs, rollout_logprobs, mask, level))
        zero = torch.zeros_like(raw)
        if mode == "truncate":
            capped, dropped = mask & (raw > cap), torch.zeros_like(mask)
            weights = torch.where(mask, torch.clamp(raw, max=cap), zero)
        else:
            capped, dropped = torch.zeros_like(mask), mask & ((raw < lower) | (raw > upper))
            weights = torch.where(mask & ~dropped, raw, zero)
        stats = {"weight_sum": weights.sum(), "capped_sum": capped.sum().float(), "masked_sum": dropped.sum().float()}
        picked = raw[mask]
        stats.update(_histogram(picked, hist_edges(mode, cap=cap, lower=lower, upper=upper)))
        stats["weight_max"] = picked.max() if picked.numel() else raw.new_zeros(())
        stats["weight_min"] = picked.min() if picked.numel() else raw.new_full((), WEIGHT_CEIL)
    return weights, stats


def _histogram(values: Tensor, edges: Tuple[float, ...]) -> Dict[str, Tensor]:
    """Counts of ``values`` (1-D, >= 0) per bucket ``[edges[k], edges[k+1])``, as float32 0-dim tensors."""
    inner = torch.tensor(edges[1:-1], dtype=values.dtype, device=values.device)
    # right=True: a value equal to an edge falls into the bucket that starts at that edge.
    index = torch.bucketize(values, inner, right=True)
    counts = torch.bincount(index, minlength=len(edges) - 1).float()
    return {hist_key(lo, hi): counts[k] for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))}

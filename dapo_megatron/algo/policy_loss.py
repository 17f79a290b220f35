"""The DAPO clipped policy-gradient loss and its aggregation over tokens and sequences.

Shapes: every per-token tensor is ``[B, T]`` and target-aligned (see :mod:`dapo_megatron.types`);
``loss_mask`` is 1 on response tokens and 0 elsewhere (any dtype; nonzero means "counts").

The normalisation contract (written once, here): :func:`aggregate_loss` returns a *local sum
divided by a global denominator*. Summing its results over every micro-batch and data-parallel rank
of one optimizer step therefore gives exactly the whole-step objective, whatever the split.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

Count = Union[int, float, Tensor]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: Optional[float] = None,
    log_ratio_clamp: float = 20.0,
    tis_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token clipped surrogate loss (the negated DAPO objective) and masked-sum statistics.

    With ``r = exp(clamp(lp - old_lp, ±log_ratio_clamp))`` and ``A`` the advantage::

        L = max(-r*A, -clip(r, 1-eps_low, 1+eps_high)*A)          (negated PPO min)
        L = min(L, -A*c)                        where A < 0 and clip_ratio_c is set (dual clip)
        L = L * tis_weights                     (detached) when given

    Returns ``(loss [B, T], stats)``. ``loss`` is 0 where the mask is 0 (and carries no gradient
    there, even if padding positions hold inf/nan log-probs). ``stats`` holds detached 0-dim
    tensors that are *sums over masked tokens* so callers can add them across micro-batches and
    ranks and divide by the summed ``num_tokens``: ``clip_high_sum``, ``clip_low_sum``,
    ``dual_clip_sum``, ``approx_kl_sum`` (sum of old_lp - lp, the spec's ppo_kl), ``ratio_sum``,
    ``ratio_max`` (a max; 0 when no token is masked in), ``num_tokens``.
    """
    mask = loss_mask != 0
    # Zero the masked-out positions *before* any arithmetic: garbage there (e.g. -inf old logprobs
    # on padding) would otherwise turn into nan gradients through torch.where's backward.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp))
    adv = torch.where(mask, advantages, torch.zeros_like(advantages)).to(ratio.dtype)

    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if clip_ratio_c is not None:
        # For A < 0 a huge ratio makes -r*A unbounded; cap the loss at -A*c (c > 1). For A >= 0 the
        # cap would be <= 0 and wrongly bind, so it applies to negative advantages only.
        bound = -adv * clip_ratio_c
        neg = adv < 0
        dual_active = neg & (loss > bound) & mask
        loss = torch.where(neg, torch.minimum(loss, bound), loss)
    if tis_weights is not None:
        loss = loss * tis_weights.detach().to(loss.dtype)
    loss = torch.where(mask, loss, torch.zeros_like(loss))

    with torch.no_grad():
        r = ratio.detach()
        a = adv.detach()
        fmask = mask.to(r.dtype)
        stats = {
            "clip_high_sum": ((a > 0) & (r > 1.0 + clip_ratio_high) & mask).sum().to(r.dtype),
            "clip_low_sum": ((a < 0) & (r < 1.0 - clip_ratio_low) & mask).sum().to(r.dtype),
            "dual_clip_sum": dual_active.sum().to(r.dtype),
            "approx_kl_sum": (-log_ratio.detach() * fmask).sum(),
            "ratio_sum": (r * fmask).sum(),
            # ratios are > 0, so 0 is a neutral element for a later max across micro-batches.
            "ratio_max": (r * fmask).max() if r.numel() else r.new_zeros(()),
            "num_tokens": fmask.sum(),
        }
    return loss, stats


def _denominator(global_value: Optional[Count], local_value: Tensor) -> Tensor:
    """The global count when given, else the local one; clamped to >= 1 so an empty step gives 0."""
    value = local_value if global_value is None else torch.as_tensor(global_value, dtype=local_value.dtype)
    return torch.clamp(value.to(local_value.device), min=1.0)


def aggregate_loss(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    mode: str,
    *,
    global_num_tokens: Optional[Count] = None,
    global_num_seqs: Optional[Count] = None,
    max_response_len: Optional[int] = None,
) -> Tensor:
    """Reduce ``[B, T]`` per-token losses to a scalar: local sum / global denominator.

    Modes (``m`` the mask, ``L`` the loss, ``S`` the sequence count, ``N`` the token count):

    - ``token-mean``: ``sum(m*L) / N`` with ``N = global_num_tokens`` (DAPO).
    - ``seq-mean-token-mean``: ``sum_i(sum_t m*L / sum_t m) / S`` (GRPO).
    - ``seq-mean-token-sum``: ``sum_i(sum_t m*L) / S``.
    - ``seq-mean-token-sum-norm``: ``sum(m*L) / (S * max_response_len)`` (Dr. GRPO).

    ``global_num_tokens`` / ``global_num_seqs`` are the whole step's counts (all micro-batches and
    data-parallel ranks). When one is None the local count is used, which is only right when this
    call sees the whole step. The local sequence count includes only rows with at least one
    response token: an empty row contributes 0 to every sum and is not a sequence of the step. When
    passing ``global_num_seqs``, count sequences the same way.

    Raises ``ValueError`` for an unknown mode, or a missing ``max_response_len`` in the norm mode.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: got {mode!r}, allowed values are {', '.join(AGG_MODES)}")
    mask = loss_mask != 0
    masked = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    fmask = mask.to(masked.dtype)
    if mode == "token-mean":
        return masked.sum() / _denominator(global_num_tokens, fmask.sum())

    row_tokens = fmask.sum(dim=-1)
    local_seqs = (row_tokens > 0).to(masked.dtype).sum()
    row_sums = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        # Empty rows have a zero sum; clamping their count to 1 keeps them at 0 instead of nan.
        return (row_sums / torch.clamp(row_tokens, min=1.0)).sum() / _denominator(global_num_seqs, local_seqs)
    if mode == "seq-mean-token-sum":
        return row_sums.sum() / _denominator(global_num_seqs, local_seqs)
    if max_response_len is None or max_response_len < 1:
        raise ValueError(f"loss_agg_mode {mode!r} needs max_response_len >= 1, got {max_response_len!r}")
    return masked.sum() / (_denominator(global_num_seqs, local_seqs) * max_response_len)

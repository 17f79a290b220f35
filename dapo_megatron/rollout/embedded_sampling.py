"""Row-wise token sampling of the embedded engine: top-k, top-p, then an inverse-CDF draw.

Every operation here is row-wise (a row's result depends only on its own log-probs, its own
``top_p``/``top_k`` and its own uniform draw ``u``), so a row samples the same token whatever other
rows share the batch. That is what lets the engine batch unrelated requests and stay reproducible:
the randomness is a uniform per row drawn from the request's own ``torch.Generator``.

The reported log-prob is never touched here: the engine reports ``logp[token]`` of the untruncated
distribution (see :mod:`dapo_megatron.rollout.base`); top-k/top-p only restrict what can be drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index drawn from each row of non-negative ``weights`` ``[B, V]`` with uniforms ``u`` ``[B]`` in
    [0, 1): the first index whose cumulative weight exceeds ``u * total``. Never an index of weight 0
    (a rounding overshoot falls back to the row's last index of positive weight)."""
    cdf = weights.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=weights.shape[-1] - 1)
    positive = weights > 0
    last_positive = weights.shape[-1] - 1 - positive.flip(-1).to(torch.int8).argmax(-1)
    ok = positive.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(ok, idx, last_positive)


def _filtered_sorted(probs: Tensor, top_p: Tensor, top_k: Tensor) -> tuple:
    """``(weights, order)``: the probabilities sorted descending (``order`` maps back to token ids),
    top-k applied (ties at the k-th value kept; ``top_k <= 0`` keeps all), renormalised, then top-p
    (the smallest prefix whose mass reaches ``top_p``; the most probable token always stays)."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    vocab = probs.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_p.gather(-1, (k - 1)[:, None])
    sorted_p = torch.where(sorted_p < kth, torch.zeros_like(sorted_p), sorted_p)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before >= top_p[:, None], torch.zeros_like(sorted_p), sorted_p)
    return sorted_p, order


def sample_rows(logp: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor) -> Tensor:
    """One token per row of ``logp`` ``[B, V]`` (log-probs at the row's temperature) -> ``[B]`` long.

    ``top_p`` ``[B]`` float in (0, 1], ``top_k`` ``[B]`` long (-1: off), ``u`` ``[B]`` uniforms in [0, 1).
    A row without top-k/top-p draws from the full distribution in vocabulary order; a filtered row
    draws from its kept mass in descending-probability order. Which path a row takes depends only on
    its own parameters, never on the other rows'.
    """
    probs = logp.exp()
    tokens = _inverse_cdf(probs, u)
    filtered = (top_p < 1.0) | ((top_k > 0) & (top_k < probs.shape[-1]))
    if bool(filtered.any()):
        weights, order = _filtered_sorted(probs, top_p, top_k)
        picked = order.gather(-1, _inverse_cdf(weights, u)[:, None]).squeeze(-1)
        tokens = torch.where(filtered, picked, tokens)
    return tokens


def sample_next(logp: Tensor, top_p: float, top_k: int, generator: torch.Generator) -> Tensor:
    """:func:`sample_rows` with one ``top_p``/``top_k`` for every row and uniforms from ``generator``."""
    rows = logp.shape[0]
    u = torch.rand(rows, generator=generator, device=logp.device, dtype=torch.float64)
    p = torch.full((rows,), float(top_p), device=logp.device, dtype=logp.dtype)
    k = torch.full((rows,), int(top_k), device=logp.device, dtype=torch.long)
    return sample_rows(logp, p, k, u)

"""The actor's side of the off-policy correction: IS weights per micro-batch and their step metrics.

The math is :func:`dapo_megatron.algo.offpolicy.offpolicy_weights`; this module binds it to the
``algo.tis`` config and to the actor's statistics: every micro-batch adds ``tis_*`` masked sums
into the update's accumulator, :func:`reduce_stats` reduces them over DP and PP, and
:func:`is_metrics` turns the reduced sums of the step's updates into ``tis/*`` metrics.

Accumulator convention (shared with the actor's own stats): a key ending in ``_max`` is reduced by
max (neutral 0), one ending in ``_min`` by min (neutral :data:`~dapo_megatron.algo.offpolicy.WEIGHT_CEIL`),
every other key by sum (neutral 0).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from dapo_megatron.algo.offpolicy import WEIGHT_CEIL, hist_edges, is_stat_keys, offpolicy_weights
from dapo_megatron.config_algo import TISConfig

PREFIX = "tis_"


def _edges(tis: TISConfig) -> Tuple[float, ...]:
    return hist_edges(tis.mode, cap=tis.cap, lower=tis.mask_low, upper=tis.mask_high)


def is_weights(mb: Any, tis: TISConfig) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
    """``(weights [b, t], tis_* stats)`` of micro-batch ``mb`` (its ``old_logprobs`` are the
    proximal policy, its ``rollout_logprobs`` the behaviour policy), or ``(None, {})`` when
    ``algo.tis`` is off. Rows of ``mb`` are whole sequences, as sequence-level weights need."""
    if not tis.enable:
        return None, {}
    weights, stats = offpolicy_weights(
        mb.old_logprobs, mb.rollout_logprobs, mb.loss_mask, level=tis.level, mode=tis.mode,
        cap=tis.cap, lower=tis.mask_low, upper=tis.mask_high,
    )  # fmt: skip
    return weights, {PREFIX + k: v for k, v in stats.items()}


def stat_keys(sum_keys: Sequence[str], peak_keys: Sequence[str], tis: TISConfig) -> Tuple[Tuple[str, ...], ...]:
    """``(sums, maxima, minima)``: the actor's keys plus the ``tis_*`` ones when IS is on. A pure
    function of the config, so every rank (also a stage that never computes a loss) agrees on it."""
    if not tis.enable:
        return tuple(sum_keys), tuple(peak_keys), ()
    sums = (*sum_keys, *(PREFIX + k for k in is_stat_keys(_edges(tis))))
    return sums, (*peak_keys, PREFIX + "weight_max"), (PREFIX + "weight_min",)


def accumulate(acc: Dict[str, float], stats: Dict[str, Tensor]) -> None:
    """Add one micro-batch's detached 0-dim stats into ``acc`` (``*_max`` by max, ``*_min`` by min)."""
    if not stats:
        return
    # One device-to-host copy for all of them (a float() per stat would be a sync each on a GPU).
    values = torch.stack([t.detach().double() for t in stats.values()]).tolist()
    for k, v in zip(stats, values):
        if k.endswith("_max"):
            acc[k] = max(acc.get(k, 0.0), v)
        elif k.endswith("_min"):
            acc[k] = min(acc.get(k, WEIGHT_CEIL), v)
        else:
            acc[k] = acc.get(k, 0.0) + v


def reduce_stats(
    acc: Dict[str, float], keys: Tuple[Tuple[str, ...], ...], *, groups: Sequence[Any], device: torch.device
) -> Dict[str, float]:
    """``acc`` summed / maxed / minned over each of ``groups`` in order (DP, then PP: only the last
    stage holds values; the others send the neutral elements). ``keys`` as :func:`stat_keys` gives
    them; their order is the wire format. Two all-reduces per group: minima travel negated with
    the maxima."""
    sum_keys, max_keys, min_keys = keys
    sums = torch.tensor([float(acc.get(k, 0.0)) for k in sum_keys], dtype=torch.float64, device=device)
    peaks = [float(acc.get(k, 0.0)) for k in max_keys] + [-float(acc.get(k, WEIGHT_CEIL)) for k in min_keys]
    peak = torch.tensor(peaks, dtype=torch.float64, device=device)
    for group in groups:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    out = dict(zip(sum_keys, sums.tolist()))
    values = peak.tolist()
    out.update(zip(max_keys, values[: len(max_keys)]))
    out.update(zip(min_keys, [-v for v in values[len(max_keys) :]]))
    return out


def is_metrics(updates: List[Dict[str, float]], num_tokens: float) -> Dict[str, float]:
    """Step metrics ``tis/*`` from the reduced per-update stats (``{}`` when IS was off).

    ``num_tokens``: the response tokens summed over the same updates. Token-weighted:
    ``tis/weight_mean`` (of the applied weight), ``tis/capped_frac``, ``tis/masked_frac`` and
    ``tis/hist_<lo>_<hi>`` (the share of tokens whose raw weight ``pi_old / pi_rollout`` lies in
    ``[lo, hi)``); ``tis/weight_max`` / ``tis/weight_min``: the raw weight's extremes (0 with no
    tokens).
    """
    if not updates or PREFIX + "weight_sum" not in updates[0]:
        return {}
    tokens = max(num_tokens, 1.0)
    out: Dict[str, float] = {}
    for key in updates[0]:
        if not key.startswith(PREFIX) or key.endswith(("_max", "_min")):
            continue
        name = key[len(PREFIX) :]
        name = name.replace("weight_sum", "weight_mean").replace("_sum", "_frac")
        out["tis/" + name] = sum(u[key] for u in updates) / tokens
    seen = num_tokens > 0
    out["tis/weight_max"] = max(u[PREFIX + "weight_max"] for u in updates) if seen else 0.0
    out["tis/weight_min"] = min(u[PREFIX + "weight_min"] for u in updates) if seen else 0.0
    return out

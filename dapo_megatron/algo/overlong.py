"""Soft overlong punishment (DAPO Eq. 13) and overlong filtering.

With ``L_max = max_response_len`` and ``L_cache = buffer_len``::

    R_length(y) = 0                                   if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                = -1                                  if |y| > L_max

times ``penalty_factor``. The penalty ramps linearly from 0 to -1 across the buffer, so it is
continuous at both edges; it is added to the rule reward by the caller.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def overlong_penalty(
    response_lengths: Union[Tensor, Sequence[int]],
    *,
    max_response_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """Length penalty ``[N]`` (float32, values in ``[-penalty_factor, 0]``) for lengths ``[N]`` in tokens."""
    if not 1 <= buffer_len <= max_response_len:
        raise ValueError(f"buffer_len must be in [1, max_response_len={max_response_len}], got {buffer_len}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float64)
    start = float(max_response_len - buffer_len)
    # float64 keeps the ramp exact for realistic lengths (tens of thousands of tokens).
    ramp = (start - lengths) / buffer_len
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    penalty = torch.where(lengths > max_response_len, torch.full_like(lengths, -1.0), penalty)
    return (penalty * penalty_factor).to(torch.float32)


def overlong_filter_mask(loss_mask: Tensor, truncated: Tensor) -> Tensor:
    """``loss_mask`` ``[N, T]`` with every row where ``truncated`` ``[N]`` (bool) is True zeroed.

    Truncated samples (stopped by the length cap) then carry no gradient and add no tokens to the
    loss denominator. The dtype of ``loss_mask`` is kept.
    """
    if truncated.shape != loss_mask.shape[:1]:
        raise ValueError(f"truncated must be [N] for loss_mask {tuple(loss_mask.shape)}, got {tuple(truncated.shape)}")
    keep = ~truncated.to(torch.bool)
    return torch.where(keep[:, None], loss_mask, torch.zeros_like(loss_mask))

"""Micro-batch shapes the schedule and the kernels need: a column multiple, and one shape for VPP.

Two kernels constrain the sequence length ``t`` of a micro-batch ``[b, t]``:

- **FP8 GEMMs** (Transformer Engine): the token dimension of every GEMM input must be a multiple
  of 16 (32 for the ``mxfp8`` recipe; megatron-core's ``fp8_utils.get_fp8_align_size`` holds the
  same table). The token dimension is ``b * t`` -- or ``b * t / tp`` with sequence parallelism --
  so a ``t`` that is a multiple of the alignment (times ``tp`` with SP) satisfies it for every ``b``.
- **Sequence parallelism** scatters the ``t`` positions over the TP ranks, so ``t % tp == 0``.

Padding adds columns on the right with every tensor 0 there, in particular ``loss_mask``: the loss,
the entropy sum and the token counts all sum under the mask, and the global denominators are
counted from the batch before any padding (``batching.plan_minibatches``), so padded positions add
exactly nothing. A causal model never lets a later column change an earlier one.
"""

from __future__ import annotations

import math
from typing import List, Optional

from dapo_megatron.megatron.batching import MicroBatch, pad_microbatch

FP8_ALIGN = 16
MXFP8_ALIGN = 32


def fp8_align_size(fp8_recipe: str) -> int:
    """Token multiple of TE's FP8 GEMMs for ``model.fp8_recipe``."""
    return MXFP8_ALIGN if fp8_recipe == "mxfp8" else FP8_ALIGN


def sequence_multiple(*, fp8: Optional[str], fp8_recipe: str, sequence_parallel: bool, tp: int) -> int:
    """The multiple every micro-batch's column count ``t`` is padded to (1: no padding).

    FP8 alone: the alignment. SP alone: ``tp``. Both: alignment x ``tp``, so that each TP rank's
    ``t / tp`` positions are themselves aligned.
    """
    if tp < 1:
        raise ValueError(f"sequence_multiple: tp must be >= 1, got {tp}")
    multiple = fp8_align_size(fp8_recipe) if fp8 is not None else 1
    return multiple * tp if sequence_parallel else multiple


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (``multiple >= 1``)."""
    if multiple < 1:
        raise ValueError(f"round_up: multiple must be >= 1, got {multiple}")
    return math.ceil(n / multiple) * multiple


def pad_for_schedule(mbs: List[MicroBatch], *, multiple: int = 1, same_shape: bool = False) -> List[MicroBatch]:
    """``mbs`` with each column count rounded up to ``multiple``; with ``same_shape`` all padded to
    the largest ``[rows, cols]`` of the list first (the interleaved schedule exchanges one fixed shape).

    Padding is zeros (``loss_mask`` 0; extra rows are dummy rows, ``rows == -1``), see the module
    docstring for why the loss and counts do not change. Micro-batches already in shape are
    returned as they are (no copy).
    """
    if not mbs:
        return mbs
    if same_shape:
        rows = max(mb.tokens.shape[0] for mb in mbs)
        cols = round_up(max(mb.tokens.shape[1] for mb in mbs), multiple)
        return [pad_microbatch(mb, rows, cols) for mb in mbs]
    return [pad_microbatch(mb, mb.tokens.shape[0], round_up(mb.tokens.shape[1], multiple)) for mb in mbs]

"""Per-token log-probabilities and entropy from vocab-parallel logits, exact and memory-bounded.

Each tensor-parallel rank holds a contiguous vocabulary shard ``[..., V/tp]`` of the logits
(megatron's output layer with ``parallel_output=True``). With ``z = logits / T`` (T = sampling
temperature, the same ``softmax(logits / T)`` the rollout engine samples from):

    lse_i    = log sum_j exp(z_ij)                  (max all-reduce, then sum-exp all-reduce)
    logp_i   = z_i,target - lse_i                   (the owning rank's logit, sum all-reduce)
    H_i      = lse_i - sum_j p_ij z_ij              (sum all-reduce), p = softmax(z)

Gradients (hand-written; no communication in the backward pass, since ``lse`` and ``H`` are saved
per token and already global):

    d logp_i / d z_ij = 1[j = target] - p_ij
    d H_i    / d z_ij = -p_ij (z_ij - lse_i + H_i)
    d / d logits      = (d / d z) / T

Memory: tokens are processed ``chunk_size`` at a time, so fp32 ``[chunk, V/tp]`` buffers are the only
vocabulary-sized temporaries: two at most (``z`` and ``exp(z - m)``, reused in place), in the forward
and again in the backward (softmax is recomputed there from the saved ``lse``). Saved for backward:
a reference to the logits (no copy), the targets and three fp32 values per token. The backward
writes the logits gradient (logits' dtype, the logits' size; unavoidable) chunk by chunk into one
buffer. The logits are never copied whole: leading dimensions are flattened by views where the
strides allow, else walked block by block (so a slice such as ``logits[:, :-1]`` or a transposed
``[s, b, v]`` view costs nothing).

Vocabulary padding: megatron pads the vocabulary to a multiple of ``128 * tp``; the padded rows of
the output layer produce real logits. ``valid_vocab_size`` masks global columns at or above it to
``-inf`` (probability 0, gradient 0). Logits that are already ``-inf`` are handled the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["token_logprobs_and_entropy"]


def _group_info(tp_group: Any) -> tuple[Any, int, int]:
    """(group or None when no communication is needed, rank in group, group size)."""
    if tp_group is None:
        return None, 0, 1
    import torch.distributed as dist

    size = dist.get_world_size(tp_group)
    if size == 1:
        return None, 0, 1
    return tp_group, dist.get_rank(tp_group), size


def _all_reduce(t: Tensor, group: Any, op: str) -> Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def _scaled(logits: Tensor, temperature: float, vocab_start: int, valid_vocab_size: Optional[int]) -> Tensor:
    """``logits / T`` in fp32 (fp64 for fp64 input) with columns at global index >= ``valid_vocab_size``
    set to ``-inf``: one fresh buffer (never a view of ``logits``), which callers may overwrite."""
    z = logits.to(_math_dtype(logits.dtype), copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    if valid_vocab_size is not None:
        local_valid = valid_vocab_size - vocab_start
        if local_valid < z.shape[-1]:
            z[:, max(local_valid, 0) :] = float("-inf")
    return z


def _zero_nonfinite_(z: Tensor) -> Tensor:
    """``z`` with its -inf (masked) entries set to 0, in place: where ``p = 0``, ``p * z`` must be 0, not nan."""
    return z.masked_fill_(torch.isfinite(z).logical_not_(), 0.0)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _target_index(targets: Tensor, vocab_start: int, local_vocab: int) -> tuple[Tensor, Tensor]:
    """(local column of each target, clamped into range; whether this rank owns it)."""
    local = targets - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), owned


def _rows_2d(x: Tensor) -> list[Tensor]:
    """``x [..., V]`` as 2-D ``[rows, V]`` views in row-major order, never copying.

    One view when the leading dims flatten (contiguous logits); otherwise split along the first dim
    (e.g. ``logits[:, :-1]`` of a ``[b, t, V]`` tensor gives ``b`` views of ``[t - 1, V]``).
    """
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        return [block for i in range(x.shape[0]) for block in _rows_2d(x[i])]


def _chunks(logits: Tensor, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    """(flat token offset, ``[<= chunk_size, V]`` view) pairs covering every token of ``logits``."""
    offset = 0
    for block in _rows_2d(logits):
        for s in range(0, block.shape[0], chunk_size):
            chunk = block[s : s + chunk_size]
            yield offset, chunk
            offset += chunk.shape[0]


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """Chunked exact log p(target) and entropy over a TP-sharded vocabulary (see module docstring)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk_size, tp_group, compute_entropy, valid_vocab_size):
        group, rank, _ = _group_info(tp_group)
        n, local_vocab = targets.numel(), logits.shape[-1]
        vocab_start = rank * local_vocab
        logp = torch.empty(n, dtype=_math_dtype(logits.dtype), device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if compute_entropy else None
        for s, block in _chunks(logits, chunk_size):
            e = s + block.shape[0]
            z = _scaled(block, temperature, vocab_start, valid_vocab_size)
            m = _all_reduce(z.max(dim=-1).values, group, "max")
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays -inf below
            idx, owned = _target_index(targets[s:e], vocab_start, local_vocab)
            z_target = torch.where(owned, z.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(m))
            exp = (z - m.unsqueeze(-1)).exp_()
            sums = [exp.sum(dim=-1), z_target]
            if compute_entropy:  # exp and z are overwritten in place: two [chunk, V] buffers at most
                sums.append(exp.mul_(_zero_nonfinite_(z)).sum(dim=-1))
            sums = _all_reduce(torch.stack(sums), group, "sum")
            lse[s:e] = m + torch.log(sums[0])
            logp[s:e] = sums[1] - lse[s:e]
            if compute_entropy:
                entropy[s:e] = lse[s:e] - sums[2] / sums[0]
            del z, exp
        ctx.save_for_backward(logits, targets, lse, entropy if compute_entropy else lse)
        ctx.config = (temperature, chunk_size, tp_group, compute_entropy, valid_vocab_size)
        if compute_entropy:
            return logp, entropy
        placeholder = torch.zeros(0, device=logits.device)
        ctx.mark_non_differentiable(placeholder)
        return logp, placeholder

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, tp_group, compute_entropy, valid_vocab_size = ctx.config
        _, rank, _ = _group_info(tp_group)
        n, local_vocab = targets.numel(), logits.shape[-1]
        vocab_start = rank * local_vocab
        grad_logits = torch.empty(n, local_vocab, dtype=logits.dtype, device=logits.device)
        use_entropy = compute_entropy and grad_entropy is not None
        for s, block in _chunks(logits, chunk_size):
            e = s + block.shape[0]
            z = _scaled(block, temperature, vocab_start, valid_vocab_size)
            p = (z - lse[s:e].unsqueeze(-1)).exp_()  # 0 on masked / -inf columns
            g_lp = grad_logp[s:e] if grad_logp is not None else torch.zeros_like(lse[s:e])
            # d/dz = -p * (g_lp + g_H * (z + H - lse)), plus g_lp at the target; built in z's and p's
            # buffers, so the backward also holds two [chunk, V] fp32 buffers at most.
            if use_entropy:
                coeff = _zero_nonfinite_(z).add_((entropy[s:e] - lse[s:e]).unsqueeze(-1))
                coeff.mul_(grad_entropy[s:e].unsqueeze(-1)).add_(g_lp.unsqueeze(-1))
            else:
                coeff = g_lp.unsqueeze(-1)
            grad_z = p.mul_(coeff).neg_()
            idx, owned = _target_index(targets[s:e], vocab_start, local_vocab)
            rows = torch.nonzero(owned).squeeze(-1)
            grad_z[rows, idx[rows]] += g_lp[rows]
            if temperature != 1.0:
                grad_z.div_(temperature)
            grad_logits[s:e] = grad_z  # cast to the logits' dtype on the copy
            del z, p, coeff, grad_z
        return grad_logits.view(logits.shape), None, None, None, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    tp_group: Any = None,
    compute_entropy: bool = True,
    valid_vocab_size: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Exact ``log softmax(logits / T)[target]`` and entropy of ``softmax(logits / T)`` per token.

    Args:
        logits: this rank's vocabulary shard, shape ``[..., V/tp]`` (any leading dims, e.g. ``[b, s]``
            or ``[s, b]``), any float dtype. Shard ``r`` holds global columns ``[r*V/tp, (r+1)*V/tp)``.
        targets: global token ids, shape ``[...]`` (the leading dims of ``logits``), integer.
        temperature: sampling temperature T > 0; the logits are divided by it first.
        chunk_size: tokens per chunk; bounds the fp32 ``[chunk, V/tp]`` temporaries.
        tp_group: tensor-parallel process group holding the other shards; ``None`` (or a group of
            size 1) means ``logits`` is the whole vocabulary and nothing is communicated.
        compute_entropy: also return the entropy (one more reduction per chunk).
        valid_vocab_size: global number of real vocabulary entries; columns at or above it (megatron's
            vocabulary padding) get probability 0. ``None`` uses every column.

    Returns:
        ``(logp, entropy)``: fp32 tensors (fp64 for fp64 logits) of shape ``[...]``, both
        differentiable w.r.t. ``logits`` (entropy is ``None`` when ``compute_entropy`` is False).
        Every rank of the TP group gets the full values; each rank's gradient lands on its shard.

    All ranks of ``tp_group`` must call this with the same token count and ``chunk_size``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits' leading dims {tuple(logits.shape[:-1])}"
        )
    if valid_vocab_size is not None and valid_vocab_size < 1:
        raise ValueError(f"valid_vocab_size must be >= 1, got {valid_vocab_size}")
    lead = targets.shape
    flat_targets = targets.reshape(-1).long()
    logp, entropy = _VocabParallelLogProbEntropy.apply(
        logits, flat_targets, float(temperature), int(chunk_size), tp_group, compute_entropy, valid_vocab_size
    )
    return logp.reshape(lead), (entropy.reshape(lead) if compute_entropy else None)

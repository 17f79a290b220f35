"""The one place that decides how a micro-batch loss is scaled before megatron sees it.

The contract (architecture habit 4, :func:`dapo_megatron.algo.policy_loss.aggregate_loss`):
the loss of one optimizer update is ``J = sum over micro-batches m and DP ranks d of l_{m,d}``,
where ``l_{m,d} = (local masked sum) / (GLOBAL denominator of the mini-batch)``. The gradient
that reaches the optimizer must be exactly ``dJ/dtheta``.

What megatron-core does to a loss returned by the ``loss_func`` of a forward step (read in
``pipeline_parallel/schedules.py::forward_step_calc_loss`` and ``distributed/``, 0.16.1; the same
code stands in the newer releases we checked, up to 0.19):

1. **Schedule.** A 2-tuple ``(loss, dict)`` is the "legacy averaging" path: the value that is
   back-propagated is ``loss * cp_size / num_microbatches``. (A 3-tuple ``(loss, num_tokens,
   dict)`` divides by ``num_tokens`` and ``num_microbatches`` instead, or, with
   ``calculate_per_token_loss=True``, by nothing -- and then ``finalize_model_grads`` divides the
   grads by the all-reduced token count. We use neither: our denominators are already global.)
2. **DDP.** With ``calculate_per_token_loss=False`` every grad bucket is multiplied by
   ``gradient_scaling_factor = 1 / dp_cp_size`` (``dp_cp_size = dp * cp``) and then SUM-reduced
   over the DP x CP group (with ``average_in_collective=True`` the factor is 1 and the collective
   averages: the same result).

So with ``calculate_per_token_loss=False``, the 2-tuple path, and a returned value ``f * l``::

    grad = sum_{m,d,c} d(f * l * cp / M) / (dp * cp) = (f / (M * dp)) * sum d(l) = (f / (M * dp)) dJ

and ``f = M * dp`` makes it exact. The CP factor cancels (the schedule multiplies by ``cp``, DDP
divides by ``dp * cp``); each CP rank's ``l`` must be its local sum over its slice of the sequence
divided by the global denominator, which is what ``aggregate_loss`` gives.

Invariants the actor relies on:
- every DP rank runs the same number ``M`` of micro-batches (batching equalises them), although the
  formula above would also hold per rank with rank-local ``M``;
- the *reported* loss is the unscaled ``l`` summed over micro-batches and DP ranks (never the
  scaled value), so it equals ``J``;
- fp16 loss scaling (``config.grad_scale_func``) multiplies the back-propagated value further and
  the optimizer divides it back out; it is orthogonal to this factor.

The behaviour is pinned by ``tests/test_actor_loss_scaling.py`` (the schedule's division) and by
the layout/micro-batch invariance tests (end to end).
"""

from __future__ import annotations

#: The DDP and TransformerConfig flags the factor below assumes. The actor sets them explicitly.
CALCULATE_PER_TOKEN_LOSS = False


def loss_scale_factor(num_microbatches: int, dp_size: int, cp_size: int = 1) -> float:
    """Multiplier ``f`` for a micro-batch loss so megatron's averaging yields ``dJ/dtheta``.

    Args:
        num_microbatches: ``M``, micro-batches this rank runs in the schedule call (>= 1).
        dp_size: data-parallel size (not counting CP), >= 1.
        cp_size: context-parallel size, >= 1. It cancels out (see the module docstring) and is
            taken only to validate it and to make the call sites state what they assume.

    Returns ``M * dp_size`` as a float.
    """
    if num_microbatches < 1 or dp_size < 1 or cp_size < 1:
        raise ValueError(
            f"loss_scale_factor: num_microbatches={num_microbatches}, dp_size={dp_size}, "
            f"cp_size={cp_size}; all must be >= 1"
        )
    return float(num_microbatches * dp_size)


def scale_loss(loss, num_microbatches: int, dp_size: int, cp_size: int = 1):
    """``loss * loss_scale_factor(...)``: the value a ``loss_func`` hands to megatron's schedule."""
    return loss * loss_scale_factor(num_microbatches, dp_size, cp_size)

"""Routing capture for MoE rollouts (R3, the rollout side): which experts each token went to.

A HF ``Qwen3MoeForCausalLM`` (transformers 5) called with ``output_router_logits=True`` returns
``router_logits``, one ``[tokens, E]`` tensor per MoE layer (the gate's pre-softmax logits, tokens
flattened batch-major: ``b * seq + s``). :func:`routed_experts` turns them into the top-k expert ids
the model used, per token and layer (tests use it as the reference of a whole-sequence forward). The
embedded engine records the gates' own ids with hooks instead (``embedded_routing``: no aux-loss
computation, and it works with the engine's slot cache); :func:`as_meta` is the shared meta form.

The ids are HF's own choice: ``topk(softmax(logits))`` picks the same experts as ``topk(logits)``
(softmax is monotone), in the same order, so they match what the rollout model computed even when
the trainer's numerics would pick differently near a tie. Pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def routed_experts(router_logits: Sequence[Tensor], topk: int, batch: int = 1) -> Tensor:
    """Top-k expert ids per token and MoE layer.

    Args:
        router_logits: per MoE layer (in layer order) the ``[batch * seq, E]`` gate logits of one
            forward call (prefill: all prompt positions; a decode step: the new positions).
        topk: experts per token (HF ``num_experts_per_tok``).
        batch: rows of the forward call (the logits are flattened batch-major).

    Returns:
        ``[batch, seq, layers, topk]`` int64, each row in descending gate-probability order.
    """
    if not router_logits:
        raise ValueError("routed_experts: no router logits (call the model with output_router_logits=True)")
    ids = torch.stack([torch.topk(logits.float(), topk, dim=-1).indices for logits in router_logits], dim=1)
    tokens = ids.shape[0]
    if tokens % batch:
        raise ValueError(f"routed_experts: {tokens} routed tokens do not split into batch={batch} rows")
    return ids.reshape(batch, tokens // batch, len(router_logits), topk)


def as_meta(ids: Tensor) -> list[list[list[int]]]:
    """One sequence's ``[seq, layers, topk]`` ids as nested lists, the JSON-friendly form an engine
    puts in ``Completion.meta["routed_experts"]`` (per token, per MoE layer, the k expert ids)."""
    if ids.dim() != 3:
        raise ValueError(f"as_meta: expected [seq, layers, topk] ids, got shape {list(ids.shape)}")
    return ids.tolist()

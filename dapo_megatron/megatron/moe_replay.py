"""Routing replay (R3, the trainer side): force each MoE router's top-k to the rollout's expert ids.

The trainer's forward and the engine's can pick different experts for a token whose top-k is near a
tie (different kernels, dtypes, batch shapes); one flipped expert changes the token's output far more
than rounding does, so the policy ratio drifts for reasons unrelated to learning. With
``algo.routing_replay: rollout`` the trainer routes every token to the experts the engine used
(captured by :mod:`dapo_megatron.rollout.routing_capture`); only the probabilities of those experts
come from the trainer's router, so the router still gets gradients.

Built on megatron-core 0.16.1's ``RouterReplay`` (``moe_enable_routing_replay``, which
:mod:`dapo_megatron.megatron.moe` turns on for every MoE build): in ``REPLAY_FORWARD`` the router
takes ``scores.gather(1, target_indices)`` instead of its own top-k. Token order inside a router is
megatron's ``[seq, batch]`` flattened seq-major (``s * batch + b``); :func:`replay_routing` takes the
ids batch-major, as the micro-batch holds them, and transposes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ContextManager, Optional

from torch import Tensor


def _routers(model_chunks: Sequence[Any]) -> list[tuple[int, Any]]:
    """``(global layer index, TopKRouter)`` of every MoE layer in this rank's chunks."""
    out = []
    for chunk in model_chunks:
        while hasattr(chunk, "module"):  # DDP / Float16Module wrappers
            chunk = chunk.module
        for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                if router.router_replay is None:
                    raise RuntimeError("routing replay: the model was built without moe_enable_routing_replay")
                out.append((layer.layer_number - 1, router))
    return out


@contextlib.contextmanager
def replay_routing(model_chunks: Sequence[Any], routed_experts: Tensor) -> Iterator[None]:
    """Inside the block, this rank's MoE layers route by ``routed_experts`` instead of their top-k.

    Args:
        model_chunks: this rank's chunks (possibly wrapped), built by ``build_model_chunks``.
        routed_experts: ``[batch, seq, num_layers, topk]`` integer expert ids (global layer index
            on dim 2; each rank uses the layers it holds), in the token layout of the forward's
            input (padding positions may hold any valid ids).

    Covers one forward (and its backward, which needs no routing unless activations are
    recomputed: then the recompute replays the same ids). The targets are cleared on exit.
    """
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    batch, seq, layers, topk = routed_experts.shape
    routers = _routers(model_chunks)
    for index, router in routers:
        if index >= layers or router.topk != topk:
            raise ValueError(
                f"routing replay: ids of shape {list(routed_experts.shape)} do not cover layer {index} "
                f"with top-{router.topk}"
            )
        # [b, s, k] -> megatron's flattened [s * b, k]
        ids = routed_experts[:, :, index, :].transpose(0, 1).reshape(seq * batch, topk).long()
        router.router_replay.set_target_indices(ids)
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for _, router in routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


class RoutingReplayError(ValueError):
    """``algo.routing_replay: rollout`` cannot be honoured (dense model, or a batch without routes)."""


def check_replay_support(routing_replay: str, moe: Optional[Any], recompute_granularity: Optional[str]) -> None:
    """At actor build: ``rollout`` replay needs a MoE model (``moe``: the spec's ``MoESpec`` or None),
    and no full activation recompute: the recompute runs in the backward, after :func:`replay_scope`
    closed, so the routers would pick their own experts there and the gradients would belong to
    another forward (selective recompute re-runs only core attention, no router)."""
    if routing_replay != "rollout":
        return
    if moe is None:
        raise RoutingReplayError(
            "algo.routing_replay=rollout replays MoE expert choices, but the model is dense (no experts); "
            "set algo.routing_replay: none"
        )
    if recompute_granularity == "full":
        raise RoutingReplayError(
            "algo.routing_replay=rollout with model.recompute_granularity=full is not supported (the backward's "
            "recompute would route by the trainer's own top-k); use selective recompute or none"
        )


def replay_scope(model_chunk: Any, routed_experts: Optional[Tensor], enabled: bool) -> ContextManager[Any]:
    """The actor's per-forward block: with ``enabled``, ``model_chunk`` routes by the micro-batch's
    ``routed_experts`` ``[b, t, layers, k]`` (:func:`replay_routing`); else nothing happens. A chunk
    without MoE layers on this stage (PP) replays nothing."""
    if not enabled:
        return contextlib.nullcontext()
    if routed_experts is None:
        raise RoutingReplayError(
            "algo.routing_replay=rollout: this micro-batch carries no routed experts (the train batch was "
            "built from samples without Sample.routed_experts; the rollout must request return_routed_experts)"
        )
    return replay_routing([model_chunk], routed_experts)

"""Router statistics of one MoE training step: expert load, dropped tokens, load-balancing loss.

:class:`MoEStepStats` watches every ``TopKRouter`` of a rank's model chunks. Between :meth:`reset`
(before a step) and :meth:`reduce` (after it, collective) it counts, per layer, what the routers
did in the step's *training* forwards (``module.training`` and autograd on: the forwards whose
backward trains; the eval-mode log-prob passes do not count, and with activation recompute only the
recomputed forward, which is the one megatron tracks too):

* ``counts[l, e]``: token-to-expert assignments that reached expert ``e`` (after capacity dropping);
* ``tokens[l]``: tokens routed (every position of every micro-batch, padding included: padding is
  routed and computed like any token, and megatron's aux loss counts it as well);
* ``dropped[l]``: assignments cut by the capacity factor, ``tokens * topk - sum_e counts[l, e]``;
* ``forwards[l]``: router calls (one per micro-batch forward).

The load-balancing loss is read from megatron-core's own tracker (``moe_utils``'s
``get_moe_layer_wise_logging_tracker``, entry ``load_balancing_loss``), which every router adds its
per-micro-batch ``aux / coeff`` to. megatron's schedule scales the aux loss's gradient by
``1 / num_microbatches`` (``MoEAuxLossAutoScaler.set_loss_scale``) and DDP by ``1 / dp``, so the
gradient of one update is ``coeff * mean over micro-batches and DP ranks of sum over layers of
aux``: counted once per optimizer update whatever the micro-batch count. The logged value is that
same mean, averaged over layers (megatron's own ``track_moe_metrics`` convention: ``1.0`` for a
perfectly balanced router, ``E`` for one that sends everything to one expert).

Reduction (:meth:`reduce`, one all-reduce per group): sums over the data-parallel group (with CP;
expert-parallel ranks are data-parallel ranks of the dense layers, each routes its own tokens), over
the pipeline group (each layer lives on one stage; the other stages send zeros), and over the tensor
group only with sequence parallelism (then each TP rank routes its own slice of the tokens; without
it every TP rank routes the same tokens).

Metrics (``moe/*``, all floats, the same on every rank):

* ``moe/expert_load_max`` / ``moe/expert_load_min``: the largest / smallest share of a layer's kept
  assignments that one expert received, over all layers and experts (``1 / E`` each when balanced);
* ``moe/dropped_token_frac``: dropped assignments / routed assignments (``tokens * topk``) over all
  layers (0 without ``model.moe_capacity_factor``);
* ``moe/aux_loss``: as above, only when the aux loss is on (``model.moe_aux_loss_coeff > 0``);
  megatron computes nothing to log otherwise.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from dapo_megatron.observability.metric_names import (
    MOE_AUX_LOSS,
    MOE_DROPPED_TOKEN_FRAC,
    MOE_EXPERT_LOAD_MAX,
    MOE_EXPERT_LOAD_MIN,
    MOE_KEYS,
)

AUX_LOSS_NAME = "load_balancing_loss"  # megatron-core's tracker key for the 'aux_loss' balancing type
# The keys this module reduces into (their meaning: observability/metric_names.py, one spelling).
EXPERT_LOAD_MAX, EXPERT_LOAD_MIN = MOE_EXPERT_LOAD_MAX, MOE_EXPERT_LOAD_MIN
DROPPED_TOKEN_FRAC, AUX_LOSS = MOE_DROPPED_TOKEN_FRAC, MOE_AUX_LOSS
KEYS = MOE_KEYS


def moe_routers(model_chunks: List[Any]) -> List[Any]:
    """Every megatron ``TopKRouter`` in ``model_chunks`` (this rank's layers, all VPP chunks)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class MoEStepStats:
    """Per-step router statistics of one rank's MoE model chunks (see the module docstring).

    Args:
        model_chunks: the unwrapped GPTModels of this rank (``MegatronActor.model_chunks``); their
            MoE layers must be built (the routers carry their global 1-based ``layer_number``).

    Raises ``ValueError`` when the chunks hold no router (a dense model), or when the config pads
    expert inputs to capacity (then the routing map no longer says which assignments were dropped).
    """

    def __init__(self, model_chunks: List[Any]) -> None:
        routers = moe_routers(model_chunks)
        if not routers:
            raise ValueError("MoEStepStats: the model chunks hold no MoE router (a dense model has no MoE stats)")
        config = routers[0].config
        if config.moe_expert_capacity_factor is not None and config.moe_pad_expert_input_to_capacity:
            raise ValueError(
                "MoEStepStats: moe_pad_expert_input_to_capacity hides the dropped tokens; it is not supported"
            )
        self.config = config
        self.num_layers = int(config.num_layers)
        self.num_experts = int(config.num_moe_experts)
        self.topk = int(config.moe_router_topk)
        self.device = routers[0].weight.device
        self._local = self._zeros()
        self._hooks = [r.register_forward_hook(self._on_route) for r in routers]
        #: The last :meth:`reduce`'s global per-layer tensors (``counts`` [L, E], ``tokens``,
        #: ``dropped``, ``forwards``, ``aux_sum`` [L]), for tests and plots.
        self.last: Dict[str, torch.Tensor] = {}

    def _zeros(self) -> Dict[str, torch.Tensor]:
        L, E = self.num_layers, self.num_experts
        z = dict(device=self.device, dtype=torch.float64)
        return {"counts": torch.zeros(L, E, **z), "tokens": torch.zeros(L, **z), "dropped": torch.zeros(L, **z),
                "forwards": torch.zeros(L, **z)}  # fmt: skip

    def _on_route(self, router: Any, inputs: Any, output: Any) -> None:
        """Forward hook of a router: ``output`` is ``(probs, routing_map)``, both ``[tokens, E]``."""
        if not (router.training and torch.is_grad_enabled()):
            return  # an eval/no-grad pass (log-probs): no gradient, no aux loss, not part of the update
        _, routing_map = output
        layer = int(router.layer_number) - 1
        with torch.no_grad():
            kept = routing_map.sum(dim=0).to(torch.float64)
            tokens = float(routing_map.shape[0])
            self._local["counts"][layer] += kept
            self._local["tokens"][layer] += tokens
            self._local["dropped"][layer] += tokens * self.topk - kept.sum()
            self._local["forwards"][layer] += 1

    def reset(self) -> None:
        """Before a step: zero this object's counters and megatron's aux-loss tracker (which nothing
        else clears outside megatron's own training loop). Local, no collective."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self._local = self._zeros()
        clear_aux_losses_tracker()

    def _local_aux(self) -> Optional[torch.Tensor]:
        """This rank's per-layer sum over router calls of megatron's tracked ``aux / coeff`` ([L]),
        or ``None`` when the aux loss is off."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        if float(self.config.moe_aux_loss_coeff or 0.0) <= 0:
            return None
        entry = get_moe_layer_wise_logging_tracker().get(AUX_LOSS_NAME)
        if entry is None:  # no training forward on this rank since reset: it contributes zeros
            return torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        return entry["values"][: self.num_layers].to(device=self.device, dtype=torch.float64)

    def _groups(self) -> List[Any]:
        from megatron.core import parallel_state as ps

        groups = [ps.get_data_parallel_group(with_context_parallel=True), ps.get_pipeline_model_parallel_group()]
        if self.config.sequence_parallel:
            groups.append(ps.get_tensor_model_parallel_group())
        return groups

    def reduce(self) -> Dict[str, float]:
        """Collective over every rank of the model: the step's ``moe/*`` metrics (module docstring).

        Call once after the step's updates; the counters keep their values until :meth:`reset`.
        Returns ``{}`` when no training forward ran anywhere since :meth:`reset`.
        """
        L, E = self.num_layers, self.num_experts
        aux = self._local_aux()
        parts = [self._local["counts"].flatten(), self._local["tokens"], self._local["dropped"],
                 self._local["forwards"]] + ([aux] if aux is not None else [])  # fmt: skip
        wire = torch.cat(parts)
        for group in self._groups():
            dist.all_reduce(wire, group=group)
        counts = wire[: L * E].view(L, E)
        tokens, dropped, forwards, aux_sum = wire[L * E :].split([L, L, L, L if aux is not None else 0])
        if self.config.sequence_parallel:  # every TP rank called its routers once per micro-batch
            forwards = forwards / self.config.tensor_model_parallel_size
        self.last = {"counts": counts, "tokens": tokens, "dropped": dropped, "forwards": forwards}
        if float(tokens.sum()) == 0:
            return {}
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        out = {
            EXPERT_LOAD_MAX: float(share.max()),
            EXPERT_LOAD_MIN: float(share.min()),
            DROPPED_TOKEN_FRAC: float(dropped.sum() / (tokens.sum() * self.topk)),
        }
        if aux is not None:
            self.last["aux_sum"] = aux_sum
            out[AUX_LOSS] = float((aux_sum / forwards.clamp_min(1.0)).mean())
        return out

    def close(self) -> None:
        """Remove the router hooks (the counters stop)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

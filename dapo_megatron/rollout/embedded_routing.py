"""Routing capture inside the embedded engine (R3): which experts each token the model read went to.

Forward hooks on the MoE gates of the transformers model record each gate's top-k expert ids, the
very ids the model dispatched its tokens to (``Qwen3MoeTopKRouter`` returns ``(logits, scores,
indices)``), so they match what the rollout computed bit for bit: no second top-k that could break a
near-tie differently. Hooks only copy a reference while a recording is open; a forward that no
request asked routing for pays one Python call per MoE layer.

Token order: a gate sees its input flattened batch-major (``[rows * seq, hidden]``), so a prefill
(``[1, P]``) gives ``[P, k]`` per layer and a decode step (``[rows, 1]``) gives ``[rows, k]``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from dapo_megatron.rollout.routing_capture import as_meta

# HF ``model_type`` -> the model's MoE gates in layer order, and where each gate's output holds the
# chosen expert ids ``[tokens, k]``.
_GATES: Dict[str, Callable[[Any], List[Any]]] = {
    "qwen3_moe": lambda model: [layer.mlp.gate for layer in model.model.layers],
}
_INDICES_AT = {"qwen3_moe": 2}


def check_routing_support(config: Any) -> None:
    """Raise ``ValueError`` when the engine cannot return routed experts for this model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _GATES:
        raise ValueError(
            f"return_routed_experts (algo.routing_replay=rollout): the embedded engine captures routing of "
            f"MoE models {sorted(_GATES)}, not model_type={model_type!r} (a dense model has nothing to replay)"
        )


class RouteRecorder:
    """Hooks on every MoE gate of ``model``; :meth:`record` collects one forward's ids."""

    def __init__(self, model: Any, config: Any):
        check_routing_support(config)
        self._at = _INDICES_AT[config.model_type]
        self._ids: Optional[List[Tensor]] = None
        self.gates = _GATES[config.model_type](model)
        for gate in self.gates:
            gate.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        if self._ids is not None:
            self._ids.append(output[self._at])

    @contextlib.contextmanager
    def record(self, enabled: bool) -> Iterator[List[Tensor]]:
        """Yields a list that, after the block, holds ``[tokens, layers, k]`` int16 (empty when not
        ``enabled`` or nothing ran). Call around exactly one forward pass."""
        box: List[Tensor] = []
        self._ids = [] if enabled else None
        try:
            yield box
            if enabled and self._ids:
                if len(self._ids) != len(self.gates):
                    raise RuntimeError(f"routing capture: {len(self._ids)} gate calls in one forward, "
                                       f"expected {len(self.gates)} (one per MoE layer)")  # fmt: skip
                # int16: expert ids < 32768; a quarter of int64's memory for long responses
                box.append(torch.stack(self._ids, dim=1).to(torch.int16).cpu())
        finally:
            self._ids = None


def row_routes(prompt_routes: Optional[Tensor], steps: List[Tensor]) -> Optional[list]:
    """One row's ``meta["routed_experts"]``: the prompt's ``[P, L, k]`` then one ``[L, k]`` per decode
    step (the token fed at that step), as nested lists ``[P + steps][L][k]``; None without a prefill."""
    if prompt_routes is None:
        return None
    ids = torch.cat([prompt_routes, torch.stack(steps)]) if steps else prompt_routes
    return as_meta(ids)

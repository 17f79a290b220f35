"""Where an HF-named tensor goes in the embedded engine's live model, checkpoint expert names included.

Weight syncs and checkpoints name a MoE model's routed experts one matrix per expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``: the on-disk Qwen3-MoE layout the
mapping in :mod:`dapo_megatron.weights.mapping` produces). transformers 5 holds them fused, one
parameter per layer: ``experts.gate_up_proj`` ``[E, 2 * I, H]`` (gate rows, then up rows) and
``experts.down_proj`` ``[E, H, I]``. :func:`target_of` gives the slice of the fused parameter an
expert matrix fills, a view, so copying into it loads the live weights in place.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

from torch import Tensor

_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def target_of(targets: Dict[str, Tensor], name: str) -> Optional[Tensor]:
    """The live tensor (or a view of one) that HF name ``name`` loads into; None when unknown.

    ``targets``: the model's ``state_dict(keep_vars=True)``. A per-expert name resolves only when the
    model holds that layer's experts fused (else the name itself is a key, and returned as is)."""
    if name in targets:
        return targets[name]
    m = _EXPERT.match(name)
    if m is None:
        return None
    prefix, expert, proj = m["prefix"], int(m["expert"]), m["proj"]
    fused = targets.get(f"{prefix}.down_proj" if proj == "down_proj" else f"{prefix}.gate_up_proj")
    if fused is None or fused.dim() != 3 or expert >= fused.shape[0]:
        return None
    if proj == "down_proj":
        return fused[expert]
    half = fused.shape[1] // 2
    return fused[expert, :half] if proj == "gate_proj" else fused[expert, half:]

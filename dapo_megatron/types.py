"""The data contract between rollout, reward, algorithm and trainer.

Alignment convention (used everywhere a per-token tensor appears):
    ``tokens[b, t]`` is the t-th token of sequence b (prompt then response, right-padded).
    Every per-token tensor (``loss_mask``, ``advantages``, ``old_logprobs``, ``rollout_logprobs``)
    has the same shape ``[B, T]`` and is **target-aligned**: entry ``[b, t]`` describes the token
    ``tokens[b, t]`` as predicted from ``tokens[b, :t]``. Entry ``[b, 0]`` is never a target and
    ``loss_mask[b, 0] == 0`` always. Prompt and padding positions have ``loss_mask == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Sample:
    """One response to one prompt.

    ``response_logprobs[i]`` is the engine's log-prob of ``response_ids[i]`` under the sampling
    distribution (temperature applied), so ``len(response_logprobs) == len(response_ids)``.
    ``score`` is the rule reward (+1/-1), ``reward`` the shaped reward used for advantages.

    Versions: ``token_versions[i]`` is the policy version of the weights that generated
    ``response_ids[i]``. A partial rollout continued across weight updates mixes versions; an empty
    list (the default, and every dump written before versions existed) means every token has
    ``weight_version``. Invariant: ``weight_version`` is the OLDEST version of the sample, so with
    versions given ``weight_version == min(token_versions)``. ``finish_reason == "abort"`` marks a
    partial trajectory (a response still to be continued).

    Routing (MoE, ``algo.routing_replay: rollout``): ``routed_experts[t][l]`` holds the ``k`` expert
    ids MoE layer ``l`` of the rollout model chose for token ``t`` of ``prompt_ids + response_ids``,
    for every token the model read: ``len == len(prompt_ids) + len(response_ids) - 1`` (the last
    response token is never fed back). Empty: not recorded. Nested lists keep dumps and
    checkpoints JSON.
    """

    prompt_ids: List[int]
    response_ids: List[int]
    response_logprobs: List[float]
    finish_reason: str
    weight_version: int = 0
    score: float = 0.0
    acc: bool = False
    pred: str = ""
    reward: float = 0.0
    token_versions: List[int] = field(default_factory=list)
    routed_experts: List[List[List[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Sample.finish_reason: got {self.finish_reason!r}, allowed {FINISH_REASONS}")
        if len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(
                f"Sample.response_logprobs: {len(self.response_logprobs)} values for "
                f"{len(self.response_ids)} response tokens"
            )
        if self.token_versions:
            if len(self.token_versions) != len(self.response_ids):
                raise ValueError(
                    f"Sample.token_versions: {len(self.token_versions)} versions for "
                    f"{len(self.response_ids)} response tokens"
                )
            if self.weight_version != min(self.token_versions):
                raise ValueError(
                    f"Sample.weight_version={self.weight_version} must be the oldest of token_versions "
                    f"(min {min(self.token_versions)})"
                )

        read = len(self.prompt_ids) + len(self.response_ids) - 1
        if self.routed_experts and len(self.routed_experts) != read:
            raise ValueError(
                f"Sample.routed_experts: routing of {len(self.routed_experts)} tokens, expected {read} "
                f"(prompt + response - 1: every token the model read)"
            )

    def versions(self) -> List[int]:
        """The version of every response token (``token_versions``, or ``weight_version`` throughout)."""
        return list(self.token_versions) if self.token_versions else [self.weight_version] * len(self.response_ids)

    @property
    def truncated(self) -> bool:
        """True when generation stopped at the length cap rather than at a stop token."""
        return self.finish_reason == "length"


@dataclass
class Group:
    """The G responses to one prompt, scored together (the unit of dynamic sampling)."""

    prompt_index: int
    ground_truth: str
    samples: List[Sample] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Padded tensors for the actor. Shapes: all ``[B, T]`` (see the module docstring).

    ``seq_group`` maps each row to its prompt group (``[B]`` long), so sequence-level aggregation
    and balanced splitting across data-parallel ranks can keep groups intact.

    ``routed_experts`` (MoE routing replay, else None): ``[B, T, moe_layers, k]`` integer expert ids,
    entry ``[b, t]`` the experts the rollout used for input token ``tokens[b, t]`` (NOT
    target-aligned: it routes position t's own hidden state). Positions without a recorded route
    (padding, a response's last token) hold ``0..k-1``: valid, distinct ids whose outputs no loss reads.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    seq_group: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    routed_experts: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        if self.tokens.dim() != 2:
            raise ValueError(f"TrainBatch.tokens: expected [B, T], got shape {tuple(shape)}")
        for name in ("loss_mask", "advantages", "rollout_logprobs", "old_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"TrainBatch.{name}: shape {tuple(value.shape)} != tokens {tuple(shape)}")
        routes = self.routed_experts
        if routes is not None and (routes.dim() != 4 or routes.shape[:2] != shape):
            raise ValueError(f"TrainBatch.routed_experts: shape {tuple(routes.shape)} != [B, T, layers, k] "
                             f"with [B, T] = {tuple(shape)}")  # fmt: skip
        if self.seq_group.shape != shape[:1]:
            raise ValueError(f"TrainBatch.seq_group: shape {tuple(self.seq_group.shape)} != [{shape[0]}]")

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

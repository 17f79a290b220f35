"""What the streaming rollout works on: one prompt to sample a group for, its failure, and the
counters of one run (shared by ``generator.py`` and the partial rollouts of ``partial.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample a group for: token ids, the ground truth for the reward, free metadata."""

    prompt_index: int
    prompt_ids: List[int]
    ground_truth: str
    metadata: dict = field(default_factory=dict)


class RolloutFailed(RuntimeError):
    """A group could not be generated within ``max_retries`` retries, or no engine is healthy."""


@dataclass
class RoundStats:
    """Counters of one run (a step) or one head start."""

    tokens: int = 0
    retries: int = 0
    late_discarded: int = 0
    aborted_tokens: int = 0  # tokens the engines had generated for requests cut once the batch was full
    offered: int = 0  # groups generated in this step and offered (carried ones excluded)
    kept: int = 0  # of those, the ones the accumulator kept: kept / offered is the keep rate

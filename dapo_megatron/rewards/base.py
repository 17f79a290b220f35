"""The reward contract: what every scorer returns and the call signature the loop relies on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

INVALID = "[INVALID]"
"""Prediction reported when no answer could be extracted from a response."""


@dataclass(frozen=True)
class RewardResult:
    """Outcome of scoring one response.

    Fields:
        score: the rule reward, +1.0 when the answer is judged correct and -1.0 otherwise.
        acc: whether the answer is judged correct (the dynamic-sampling and eval metric).
        pred: the prediction that was compared (normalised form for ``dapo_math``), or ``"[INVALID]"``.
    """

    score: float
    acc: bool
    pred: str


class RewardFn(Protocol):
    """A scorer of untrusted model output.

    Implementations never raise, never evaluate the text, and return within a bounded time; any
    internal failure is reported as ``RewardResult(-1.0, False, ...)``.
    """

    def __call__(self, response: str, ground_truth: str) -> RewardResult: ...


def wrong(pred: str = INVALID) -> RewardResult:
    """The result for an answer that is not (or could not be judged) correct."""
    return RewardResult(score=-1.0, acc=False, pred=pred)

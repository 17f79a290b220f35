"""The reward contract: what every scorer returns and the call signature the loop relies on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

INVALID = "[INVALID]"
"""Prediction reported when no answer could be extracted from a response."""

MAX_GROUND_TRUTH_CHARS = 4_000
"""Longest ground truth (in characters) a dataset row may carry. A reference *final answer* is a few
dozen characters; the bound keeps scoring time and the normalised-answer cache small, and keeps a
math-verify request far below a pipe's buffer size. Rows over it are refused at load time
(:func:`check_ground_truth`); scorers called directly with a longer one score it wrong at once."""


class GroundTruthTooLongError(ValueError):
    """A dataset row's ground truth is longer than :data:`MAX_GROUND_TRUTH_CHARS`."""


def check_ground_truth(ground_truth: str, *, where: str) -> None:
    """Raise :class:`GroundTruthTooLongError` naming ``where`` (file and row), the length and the limit."""
    if len(ground_truth) > MAX_GROUND_TRUTH_CHARS:
        raise GroundTruthTooLongError(
            f"{where}: field 'reward_model.ground_truth' has {len(ground_truth)} characters; expected a final "
            f"answer of at most {MAX_GROUND_TRUTH_CHARS} characters (MAX_GROUND_TRUTH_CHARS); fix or drop the row"
        )


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

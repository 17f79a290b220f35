"""Rewards: scoring untrusted model output against a ground truth.

Every scorer is a ``RewardFn``: it never raises, never evaluates the text and returns within a
bounded time. Choose one by name with ``get_reward_fn`` (``RewardConfig.name``):

* ``dapo_math``: the reference DAPO-Math rule (extract ``Answer:``, normalise, compare strings);
* ``math_verify``: symbolic equivalence with math-verify, in worker processes under a hard timeout.

Importing this package imports neither math-verify nor sympy; ``math_verify`` loads in its workers.
"""

from __future__ import annotations

from typing import Callable

from dapo_megatron.rewards.base import INVALID, RewardFn, RewardResult
from dapo_megatron.rewards.dapo_math import extract_answer, normalize_answer, score_dapo_math
from dapo_megatron.rewards.math_verify_scorer import MathVerifyScorer


def _dapo_math(timeout_s: float) -> RewardFn:
    # Linear-time by construction, so the timeout needs no enforcement here.
    return score_dapo_math


def _math_verify(timeout_s: float) -> RewardFn:
    return MathVerifyScorer(timeout_s=timeout_s)


REWARD_FNS: dict[str, Callable[[float], RewardFn]] = {
    "dapo_math": _dapo_math,
    "math_verify": _math_verify,
}
"""Scorer factories by ``RewardConfig.name``; each takes the per-response timeout in seconds."""


def get_reward_fn(name: str, timeout_s: float = 5.0) -> RewardFn:
    """Build the scorer called ``name`` (a key of ``REWARD_FNS``).

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
        ImportError: for ``math_verify`` when math-verify is not installed.
    """
    try:
        factory = REWARD_FNS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(sorted(REWARD_FNS))
        raise ValueError(f"reward.name must be one of {{{allowed}}}, got {name!r}") from None
    return factory(timeout_s)


__all__ = [
    "INVALID",
    "REWARD_FNS",
    "MathVerifyScorer",
    "RewardFn",
    "RewardResult",
    "extract_answer",
    "get_reward_fn",
    "normalize_answer",
    "score_dapo_math",
]

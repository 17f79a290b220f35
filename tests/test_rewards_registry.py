"""Choosing a scorer by name, and keeping the rewards package light to import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dapo_megatron.rewards import MathVerifyScorer, RewardFn, RewardResult, get_reward_fn, score_dapo_math


def test_dapo_math_by_name() -> None:
    fn: RewardFn = get_reward_fn("dapo_math")
    assert fn is score_dapo_math
    assert fn("Answer: 3", "3") == RewardResult(1.0, True, "3")


def test_math_verify_by_name_carries_the_timeout() -> None:
    fn = get_reward_fn("math_verify", timeout_s=2.5)
    assert isinstance(fn, MathVerifyScorer)
    assert fn.timeout_s == 2.5
    fn.close()


@pytest.mark.parametrize("name", ["unknown", "DAPO_MATH", ""])
def test_unknown_name_lists_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"dapo_math, math_verify") as info:
        get_reward_fn(name)
    assert repr(name) in str(info.value)


def test_result_is_frozen() -> None:
    result = RewardResult(1.0, True, "1")
    with pytest.raises(AttributeError):
        result.score = 0.0  # type: ignore[misc]


def test_import_does_not_load_math_verify_or_sympy() -> None:
    code = (
        "import sys, dapo_megatron.rewards as r; r.get_reward_fn('math_verify').close(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('math_verify', 'sympy', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

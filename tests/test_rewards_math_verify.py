"""math-verify scorer: symbolic equivalence, hard timeout via worker processes, any thread, never raises."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from dapo_megatron.rewards import INVALID, MathVerifyScorer, RewardResult
from dapo_megatron.rewards.math_verify_scorer import prediction_text
from dapo_megatron.rewards.math_verify_worker import judge

TIMEOUT_S = 1.5
# A tower of powers: sympy never finishes comparing it with 1.
ADVERSARIAL = "Answer: $9^{9^{9^{9^{9}}}}$"


@pytest.fixture(scope="module")
def scorer() -> Iterator[MathVerifyScorer]:
    with MathVerifyScorer(timeout_s=TIMEOUT_S) as s:
        assert s.warmup()
        yield s


@pytest.mark.parametrize(
    ("response", "ground_truth", "pred"),
    [
        ("Answer: 0.5", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("Answer: $\\frac{1}{2}$", "0.5", "\\frac{1}{2}"),
        ("Answer: 1/2", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("Therefore the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", "\\frac{1}{2}"),
        ("Answer: x^2 + 1", "1 + x^2", "x^2 + 1"),
        ("Answer: (1,2)", "(1,2)", "(1,2)"),
        ("Answer: 2\n\nAnswer: 3", "3", "3"),
    ],
)
def test_equivalent_forms_are_correct(scorer: MathVerifyScorer, response: str, ground_truth: str, pred: str) -> None:
    assert scorer(response, ground_truth) == RewardResult(1.0, True, pred)


@pytest.mark.parametrize(
    ("response", "ground_truth", "pred"),
    [
        ("Answer: 3", "0.5", "3"),
        ("Answer: -\\frac{1}{2}", "\\frac{1}{2}", "-\\frac{1}{2}"),
        ("Answer: 3\n\nAnswer: 2", "3", "2"),  # the last answer line wins
        ("no answer at all", "3", INVALID),
        ("Answer: 3\n" + "z" * 400, "3", INVALID),  # outside the last 300 characters
    ],
)
def test_wrong_answers_are_incorrect(scorer: MathVerifyScorer, response: str, ground_truth: str, pred: str) -> None:
    assert scorer(response, ground_truth) == RewardResult(-1.0, False, pred)


def test_prediction_text_uses_the_tail() -> None:
    assert prediction_text("x" * 1000 + "Answer:  7 \n") == ("7", True)
    assert prediction_text("Answer: 7\n" + "y" * 300) == ("y" * 300, False)


def test_judge_in_process() -> None:
    import math_verify

    assert judge(math_verify, "\\frac{1}{2}", "0.5", True) == (True, "\\frac{1}{2}")
    assert judge(math_verify, "2", "so \\boxed{3} it is", False) == (False, "3")
    assert judge(math_verify, "2", "nothing to parse", False) == (False, INVALID)


def test_adversarial_input_is_cut_off_and_the_scorer_recovers(scorer: MathVerifyScorer) -> None:
    start = time.perf_counter()
    result = scorer(ADVERSARIAL, "1")
    seconds = time.perf_counter() - start
    print(f"adversarial math-verify call: {seconds:.2f} s (timeout {TIMEOUT_S} s)")
    assert result == RewardResult(-1.0, False, INVALID)
    assert TIMEOUT_S * 0.9 < seconds < TIMEOUT_S + 2.0  # it really ran into the timeout, and stopped
    assert scorer("Answer: 4", "4") == RewardResult(1.0, True, "4")


def test_consecutive_timeouts_each_stay_within_the_budget() -> None:
    """The worker killed by a timeout is replaced by a warm spare: the next call does not pay the
    replacement's start-up (about a second of imports) on top of its own timeout."""
    timeout_s, margin_s = 3.0, 0.5
    with MathVerifyScorer(timeout_s=timeout_s) as s:
        assert s.warmup()
        for k in range(2):
            start = time.perf_counter()
            result = s(ADVERSARIAL, "1")
            seconds = time.perf_counter() - start
            print(f"adversarial call {k}: {seconds:.2f} s (timeout {timeout_s} s)")
            assert result == RewardResult(-1.0, False, INVALID)
            assert timeout_s * 0.9 < seconds < timeout_s + margin_s, (k, seconds)
        # On a loaded machine the spare may still be importing; once it is ready, scoring works.
        assert s.warmup()
        assert s("Answer: 4", "4") == RewardResult(1.0, True, "4")


def test_huge_response_is_cheap(scorer: MathVerifyScorer) -> None:
    start = time.perf_counter()
    result = scorer("{" * 5_000_000 + "\nAnswer: 4", "4")
    assert result == RewardResult(1.0, True, "4")
    assert time.perf_counter() - start < TIMEOUT_S + 2.0


def test_calls_from_other_threads(scorer: MathVerifyScorer) -> None:
    jobs = [("Answer: 0.5", "1/2", True), ("Answer: 7", "8", False), ("Answer: 3", "3", True)]
    results: dict[int, RewardResult] = {}

    def work(i: int) -> None:
        results[i] = scorer(jobs[i][0], jobs[i][1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i].acc for i in range(len(jobs))] == [acc for _, _, acc in jobs]


def test_adversarial_input_from_a_thread_is_cut_off(scorer: MathVerifyScorer) -> None:
    out: list[RewardResult] = []
    thread = threading.Thread(target=lambda: out.append(scorer(ADVERSARIAL, "1")))
    start = time.perf_counter()
    thread.start()
    thread.join(timeout=60)
    assert out == [RewardResult(-1.0, False, INVALID)]
    assert time.perf_counter() - start < TIMEOUT_S + 2.0


@pytest.mark.parametrize(("response", "ground_truth"), [(None, "1"), (b"Answer: 1", "1"), ("Answer: 1", None)])
def test_bad_inputs_never_raise(scorer: MathVerifyScorer, response: object, ground_truth: object) -> None:
    assert scorer(response, ground_truth) == RewardResult(-1.0, False, INVALID)  # type: ignore[arg-type]


def test_closed_scorer_scores_wrong_without_raising() -> None:
    s = MathVerifyScorer(timeout_s=1.0)
    s.close()
    assert s("Answer: 1", "1") == RewardResult(-1.0, False, INVALID)


def test_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifyScorer(timeout_s=0)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import dapo_megatron.rewards.math_verify_scorer as mod

    def not_found(name: str, package: object = None) -> None:
        assert name == "math_verify"
        return None

    monkeypatch.setattr(mod.importlib.util, "find_spec", not_found)
    with pytest.raises(ImportError, match=r"math_verify.*extra"):
        MathVerifyScorer(timeout_s=1.0)

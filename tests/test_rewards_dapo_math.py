"""DAPO-Math rule reward: hand-computed table, helpers, bounded time on adversarial input, never raises.

Every expectation below was worked out by hand from the spec's steps (extract the last
``Answer\\s*:\\s*([^\\n]+)`` in the last 300 characters, normalise steps 1-9, compare strings).
"""

from __future__ import annotations

import random
import re
import time

import pytest

from dapo_megatron.rewards import INVALID, RewardResult, extract_answer, normalize_answer, score_dapo_math
from dapo_megatron.rewards.dapo_math import _REMOVED, _SUBSTITUTIONS, TAIL_CHARS

OK, BAD = 1.0, -1.0

# (response, ground_truth, expected score, expected normalised pred)
CASES = [
    # plain and boxed
    ("Answer: 42", "42", OK, "42"),
    ("Answer: \\boxed{42}", "42", OK, "42"),
    ("So the result is \\boxed{42}.", "42", BAD, INVALID),  # a box alone is not an answer line
    ("Answer: \\boxed{\\frac{1}{2}}", "\\frac12", OK, "\\frac{1}{2}"),
    # the reference unwraps \boxed{ greedily up to the line's LAST "}"
    ("Answer: \\boxed{1}, \\boxed{2}", "1,2", BAD, "1},\\boxed{2"),
    # several answer lines: the last one wins
    ("Answer: 41\nAnswer: 42", "42", OK, "42"),
    ("Answer: 42\nAnswer: 41", "42", BAD, "41"),
    # commas in numbers
    ("Answer: 1,000", "1000", OK, "1000"),
    ("Answer: 1000", "1,000", OK, "1000"),
    ("Answer: 1,000,000", "1000000", OK, "1000000"),
    ("Answer: -1,000", "-1000", BAD, "-1,000"),  # "-1000" is not all digits, so commas stay
    ("Answer: 1,000.5", "1000.5", BAD, "1,000.5"),
    ("Answer: 1,2,3", "123", OK, "123"),  # a list of digits collapses (reference quirk)
    ("Answer: (1,2)", "(1,2)", OK, "(1,2)"),
    # fractions and roots
    ("Answer: \\frac12", "\\frac{1}{2}", OK, "\\frac{1}{2}"),
    ("Answer: \\frac{1}{2}", "\\frac12", OK, "\\frac{1}{2}"),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", BAD, "\\dfrac{1}{2}"),
    ("Answer: \\sqrt2", "\\sqrt{2}", OK, "\\sqrt{2}"),
    ("Answer: 2\\sqrt3", "2\\sqrt{3}", OK, "2\\sqrt{3}"),
    ("Answer: \\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", OK, "\\frac{\\sqrt{3}}{2}"),
    ("Answer: 0.5", "\\frac{1}{2}", BAD, "0.5"),  # string comparison, not symbolic
    # units and unit tokens
    ("Answer: 5 dollars", "5", OK, "5"),
    ("Answer: 10 cm", "10", OK, "10"),
    ("Answer: 30^\\circ", "30", OK, "30"),
    ("Answer: 30^{\\circ}", "30", OK, "30"),
    ("Answer: 90 degrees", "90", OK, "90"),
    ("Answer: 10 mph", "10", OK, "10"),
    ("Answer: 6 square units", "6", OK, "6"),
    ("Answer: 3 \\text{ ways}", "3", OK, "3"),
    ("Answer: 12\\mbox{ cm}", "12", OK, "12"),
    ("Answer: \\$5", "5", OK, "5"),
    ("Answer: 5\\%", "5", BAD, "5\\%"),
    # dollars
    ("Answer: $42$", "42", OK, "42"),
    ("Answer: The final value is $42$.", "42", OK, "42"),
    ("Answer: $42.$", "42", OK, "42"),
    ("Answer: 42.", "42", BAD, "42."),
    # signs and equations
    ("Answer: -5", "-5", OK, "-5"),
    ("Answer: -5", "5", BAD, "-5"),
    ("Answer: x = 7", "7", OK, "7"),
    ("Answer: y = 2x + 3 = 11", "11", OK, "11"),
    ("Answer: x^2 + 1", "x^2+1", OK, "x^2+1"),
    # "an " and "a " removal
    ("Answer: a 12", "12", OK, "12"),
    ("Answer: an 8", "8", OK, "8"),
    # no answer line
    ("I think it is 42", "42", BAD, INVALID),
    ("", "42", BAD, INVALID),
    # markdown bold: "Answer" ":" matches, and the capture starts right after the colon, so the
    # closing "**" is part of the prediction and the answer is wrong.
    ("**Answer:** 42", "42", BAD, "**42"),
    # case and spacing of the keyword
    ("answer: 7", "7", OK, "7"),
    ("ANSWER : 7", "7", OK, "7"),
    ("Answer:42", "42", OK, "42"),
    ("Answer:\n42", "42", OK, "42"),  # \s* after the colon crosses the newline
    ("Answer: 7\n\nThat is all.", "7", OK, "7"),
    # \text{} / \textbf{} / \overline{} unwrapping
    ("Answer: \\text{(B)}", "(B)", OK, "(B)"),
    ("Answer: \\text{Monday}", "Monday", OK, "Monday"),
    ("Answer: \\textbf{17}", "17", OK, "17"),
    ("Answer: 0.\\overline{3}", "0.3", OK, "0.3"),
    # \text{and} lists become commas (and then, all digits, the commas go)
    ("Answer: 1 \\text{ and } 2", "1, 2", OK, "12"),
    ("Answer: x, \\text{and} y", "x,y", OK, "x,y"),
    # the ground truth is normalised by the same rule
    ("Answer: 42", "\\boxed{42}", OK, "42"),
    ("Answer: 5", "$5$ dollars", OK, "5"),
    ("Answer: 3", "x = 3", OK, "3"),
    # only the last 300 characters are read
    ("Answer: 42\n" + "x" * TAIL_CHARS, "42", BAD, INVALID),
    ("y" * 1000 + "\nAnswer: 42", "42", OK, "42"),
    ("Answer: 42" + "z" * (TAIL_CHARS - len("Answer: 42")), "42", BAD, "42" + "z" * 290),
]


@pytest.mark.parametrize(("response", "ground_truth", "score", "pred"), CASES)
def test_table(response: str, ground_truth: str, score: float, pred: str) -> None:
    result = score_dapo_math(response, ground_truth)
    assert result == RewardResult(score=score, acc=score > 0, pred=pred)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40


def test_trailing_eos_text_is_stripped_once() -> None:
    eos = "<|im_end|>"
    assert score_dapo_math("Answer: 42" + eos, "42", eos_text=eos) == RewardResult(1.0, True, "42")
    assert score_dapo_math("Answer: 42" + eos, "42") == RewardResult(-1.0, False, "42<|im_end|>")
    # only one trailing copy, and only at the end
    assert score_dapo_math("Answer: 42" + eos + eos, "42", eos_text=eos).pred == "42<|im_end|>"
    assert score_dapo_math("Answer: 42\n" + eos + " ", "42", eos_text=eos) == RewardResult(1.0, True, "42")
    # the EOS is stripped before the 300-character tail is taken
    long = "Answer: 42" + "w" * (TAIL_CHARS - 10) + eos
    assert score_dapo_math(long, "42", eos_text=eos).pred == "42" + "w" * (TAIL_CHARS - 10)


def test_extract_answer() -> None:
    assert extract_answer("blah\nAnswer: $x$ \nmore\nanswer :  9  ") == "9  "
    assert extract_answer("no answer") == INVALID
    assert extract_answer("Answer: 1\n" + "." * TAIL_CHARS) == INVALID


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  \\boxed{ 12 }  ", "12"),
        ("a=1,b=2", "2"),
        ("\\text{hello", "\\text{hello"),  # unclosed: left as is
        ("\\text{a}\\text{b}", "ab"),
        ("\\text{a\\text{b}}", "a\\text{b}"),  # shortest match, not nested
        ("\\text{x\n}y", "\\text{x\n}y"),  # the close brace must be on the same line
        ("$1$ and $2$\n$3$", "1\n3"),  # first $...$ pair of each line
        ("\\frac1{2}", "\\frac{1}{{}2}"),  # reference quirk: any char after the first is taken
        ("\\sqrt23", "\\sqrt{2}3"),
        ("issue", "is"),  # plain substring removal of "sue"
        ("1,234", "1234"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def _regex_normalizer(s: str) -> str:
    """The normaliser written with the backtracking regexes the reference describes; test oracle only."""
    s = s.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    for token in _REMOVED:
        s = s.replace(token, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
    s = re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
    s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
    s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def test_linear_normaliser_matches_regex_semantics_on_random_strings() -> None:
    pieces = ["\\text{", "\\textbf{", "\\overline{", "\\boxed{", "}", "{", "$", "\n", "frac", "sqrt"]
    pieces += ["1", "2", ",", " ", "=", "a", "\\$", ".", "x", "cm", "\\text{m}"]
    rng = random.Random(1234)
    for _ in range(5000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert normalize_answer(s) == _regex_normalizer(s), repr(s)


def _timed(response: object, ground_truth: object) -> tuple[RewardResult, float]:
    start = time.perf_counter()
    result = score_dapo_math(response, ground_truth)  # type: ignore[arg-type]
    return result, time.perf_counter() - start


MB = 1_000_000


@pytest.mark.parametrize(
    ("name", "response", "ground_truth", "expected"),
    [
        ("10MB of Answer:", "Answer:" * (10 * MB // 7), "42", None),
        ("10MB text, answer at end", "lorem ipsum " * (10 * MB // 12) + "\nAnswer: 42", "42", "42"),
        ("1MB of { then boxed", "{" * MB + "Answer: \\boxed{" * 20 + "7", "7", None),
        ("1MB of \\boxed{ nesting", "\\boxed{" * (MB // 7) + "Answer: " + "\\boxed{" * 30, "7", None),
        ("1MB of spaces before Answer:", " " * MB + "Answer: 5", "5", "5"),
        ("Answer + 1MB tabs + colon", "Answer" + "\t" * MB + ":" + " " * 200 + "9", "9", None),
        ("Answer: then 1MB newlines", "Answer:" + "\n" * MB, "1", None),
        ("huge unclosed \\text{ ground truth", "Answer: 1", "\\text{" * (MB // 6), None),
        ("huge \\boxed{ ground truth", "Answer: 1", "\\boxed{" * (MB // 7) + "}" * 1000, None),
        ("huge $ and = ground truth", "Answer: 1", "$=" * MB, None),
        ("huge frac/sqrt ground truth", "Answer: 1", "fracsqrt" * (MB // 8), None),
    ],
)
def test_adversarial_inputs_finish_fast(name: str, response: str, ground_truth: str, expected: str | None) -> None:
    result, seconds = _timed(response, ground_truth)
    print(f"{name}: {seconds * 1000:.1f} ms")
    assert seconds < 2.0
    if expected is None:
        assert result.acc is False and result.score == -1.0
    else:
        assert result == RewardResult(1.0, True, expected)


@pytest.mark.parametrize(
    ("response", "ground_truth", "pred"),
    [
        (None, "1", INVALID),
        (b"Answer: 1", "1", INVALID),
        (123, "1", INVALID),
        ("Answer: 1", None, "1"),
        ("Answer: 1", b"1", "1"),
        ("Answer: \ud800", "1", "\ud800"),  # a lone surrogate is just another character
    ],
)
def test_bad_inputs_never_raise(response: object, ground_truth: object, pred: str) -> None:
    result = score_dapo_math(response, ground_truth)  # type: ignore[arg-type]
    assert result == RewardResult(-1.0, False, pred)


def test_internal_error_is_reported_as_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    import dapo_megatron.rewards.dapo_math as dapo_math

    calls: list[str] = []

    def broken(s: str) -> str:
        calls.append(s)
        if len(calls) == 2:  # the ground truth
            raise RuntimeError("boom")
        return s

    monkeypatch.setattr(dapo_math, "normalize_answer", broken)
    dapo_math.normalized_ground_truth.cache_clear()  # "4" may be cached by an earlier test
    assert dapo_math.score_dapo_math("Answer: 4", "4") == RewardResult(-1.0, False, "4")
    assert calls == ["4", "4"]


def test_a_repeated_ground_truth_is_normalised_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group's responses share one ground truth: it is normalised on the first call only."""
    import dapo_megatron.rewards.dapo_math as dapo_math

    seen: list[str] = []
    real = dapo_math.normalize_answer

    def counting(s: str) -> str:
        seen.append(s)
        return real(s)

    monkeypatch.setattr(dapo_math, "normalize_answer", counting)
    truth = "\\frac{1}{2} (a ground truth used by no other test)"
    results = [dapo_math.score_dapo_math(f"Answer: {k}", truth) for k in range(16)]
    assert all(r.acc is False for r in results)
    assert seen.count(truth) == 1
    assert dapo_math.score_dapo_math("Answer: " + real(truth), truth).acc  # the cached value is the right one


def test_ground_truth_over_the_bound_is_wrong_in_bounded_time() -> None:
    from dapo_megatron.rewards.base import MAX_GROUND_TRUTH_CHARS

    # Text before the last "=" is dropped by the normaliser, so both of these normalise to "7".
    at_limit = "y" * (MAX_GROUND_TRUTH_CHARS - 2) + "=7"
    assert score_dapo_math("Answer: 7", at_limit) == RewardResult(1.0, True, "7")
    assert score_dapo_math("Answer: 7", "y" + at_limit) == RewardResult(-1.0, False, "7")
    result, seconds = _timed("Answer: 1", "x" * (5 * MB))
    print(f"5 MB ground truth: {seconds * 1000:.3f} ms")
    assert result == RewardResult(-1.0, False, "1") and seconds < 0.01


def test_check_ground_truth_names_the_limit_and_the_place() -> None:
    from dapo_megatron.rewards.base import MAX_GROUND_TRUTH_CHARS, GroundTruthTooLongError, check_ground_truth

    check_ground_truth("1" * MAX_GROUND_TRUTH_CHARS, where="f.jsonl row 3")
    with pytest.raises(GroundTruthTooLongError) as err:
        check_ground_truth("1" * (MAX_GROUND_TRUTH_CHARS + 1), where="f.jsonl row 3")
    text = str(err.value)
    assert "f.jsonl row 3" in text and "reward_model.ground_truth" in text
    assert f"{MAX_GROUND_TRUTH_CHARS + 1}" in text and f"{MAX_GROUND_TRUTH_CHARS}" in text
    assert isinstance(err.value, ValueError)  # the CLI reports ValueErrors as input errors (exit 2)


def test_loading_refuses_an_over_long_ground_truth_before_tokenizing(tmp_path) -> None:
    """The bound holds at load time (train, eval and demo all read prompts through ``load_prompts``)."""
    import json

    from dapo_megatron.config import Config
    from dapo_megatron.controller.prompts import load_prompts
    from dapo_megatron.rewards.base import MAX_GROUND_TRUTH_CHARS, GroundTruthTooLongError

    def row(k: int, truth: str) -> str:
        prompt = [{"role": "user", "content": f"problem {k}"}]
        return json.dumps({"prompt": prompt, "reward_model": {"ground_truth": truth, "style": "rule"}})

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(row(0, "1") + "\n")
    bad.write_text(row(1, "2") + "\n" + row(2, "9" * (MAX_GROUND_TRUTH_CHARS + 1)) + "\n")
    # tokenizer=None: the bound must be checked before any prompt is tokenized.
    with pytest.raises(GroundTruthTooLongError, match=rf"{re.escape(str(bad))} row 1\b.*{MAX_GROUND_TRUTH_CHARS}"):
        load_prompts([str(good), str(bad)], None, Config())

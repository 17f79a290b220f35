"""The demo's synthetic tasks: one-operation problems and chained sums whose supervised answer works
the sum out step by step (long enough responses for overlong shaping and clip-higher to act on)."""

import pytest

from dapo_megatron.config import DemoConfig
from dapo_megatron.controller.demo_task import DEMO_CHARS, make_rows, worked_answer


def test_one_operation_is_answered_directly_and_a_chain_step_by_step():
    assert worked_answer("12+7", "19") == "Answer: 19"
    assert worked_answer("12*7", "84") == "Answer: 84"
    assert worked_answer("12+7+5+13", "37") == "12+7=19 19+5=24 24+13=37 Answer: 37"
    # a template around the problem does not matter: the last chain in the text is the problem
    assert worked_answer("Solve step by step.\n\n3+4+5", "12") == "3+4=7 7+5=12 Answer: 12"


def test_chained_rows_are_distinct_sums_with_answers_of_30_to_60_tokens_on_average():
    rows = make_rows(300, seed=0, max_operand=19, chain=4)
    texts = [r["prompt"][0]["content"] for r in rows]
    assert len(set(texts)) == 300 and all(t.count("+") == 3 for t in texts)
    for row, text in zip(rows, texts):
        assert row["reward_model"]["ground_truth"] == str(sum(int(t) for t in text.split("+")))
    answers = [worked_answer(t, r["reward_model"]["ground_truth"]) for r, t in zip(rows, texts)]
    assert all(set(a) <= set(DEMO_CHARS) for a in answers)  # the character tokenizer covers them
    # one token per character, plus EOS
    lengths = [len(a) + 1 for a in answers]
    assert 30 <= sum(lengths) / len(lengths) <= 60 and max(lengths) <= 40, lengths  # fits 48 with the buffer
    assert make_rows(5, seed=0, max_operand=19) == make_rows(5, seed=0, max_operand=19, chain=2)


BAD = [({"chain": 1}, "demo.chain"), ({"chain": 3, "ops": ("+", "*")}, "demo.chain"),
       ({"chain": 3, "max_operand": 2, "num_train": 30}, "demo.num_train")]  # fmt: skip


@pytest.mark.parametrize("bad,field", BAD)
def test_bad_chain_settings_are_refused_by_name(bad, field):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**bad)

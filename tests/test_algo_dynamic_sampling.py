"""Dynamic sampling: the accuracy filter, the accumulator across rounds, the bound, padding, resume."""

import pickle

import pytest

from dapo_megatron.algo import (
    DynamicSamplingExhausted,
    GroupAccumulator,
    group_is_informative,
    overlong_penalty,
)
from dapo_megatron.types import Group, Sample


def _group(idx, accs, lengths=None, max_len=20, buffer=4):
    """A Group whose samples are right/wrong per ``accs``; shaped reward = score + overlong penalty."""
    lengths = lengths or [3] * len(accs)
    penalty = overlong_penalty(lengths, max_response_len=max_len, buffer_len=buffer).tolist()
    samples = []
    for acc, n, pen in zip(accs, lengths, penalty):
        score = 1.0 if acc else -1.0
        samples.append(
            Sample(
                prompt_ids=[1],
                response_ids=[2] * n,
                response_logprobs=[-0.5] * n,
                finish_reason="stop",
                score=score,
                acc=acc,
                reward=score + pen,
            )
        )
    return Group(prompt_index=idx, ground_truth="42", samples=samples)


def _accs(group):
    return [float(s.acc) for s in group.samples]


INFO = [True, False]  # accuracy varies
ZERO = [False, False]  # all wrong


def test_group_is_informative():
    assert group_is_informative([1.0, 0.0, 1.0])
    assert not group_is_informative([1.0, 1.0, 1.0])
    assert not group_is_informative([0.0, 0.0])
    assert not group_is_informative([1.0])  # a single response has no spread
    assert not group_is_informative([])


def test_all_wrong_group_is_dropped_although_shaped_rewards_vary():
    # All four answers wrong, but lengths 10, 17, 18, 20 in a 20-token window with a 4-token buffer
    # give penalties 0, -0.25, -0.5, -1, so the shaped rewards are -1, -1.25, -1.5, -2.
    g = _group(0, [False] * 4, lengths=[10, 17, 18, 20])
    rewards = [s.reward for s in g.samples]
    assert rewards == [-1.0, -1.25, -1.5, -2.0]
    assert group_is_informative(rewards)  # filtering on the shaped reward would wrongly keep it
    acc = GroupAccumulator(target_groups=1)
    assert acc.begin_round()
    assert acc.offer(g, _accs(g)) is False
    assert acc.kept == 0 and acc.generated == 1


def test_fills_across_rounds_and_trims_surplus():
    acc = GroupAccumulator(target_groups=3, max_num_gen_batches=0)
    groups = [_group(i, INFO if i != 1 else ZERO) for i in range(5)]
    assert acc.begin_round()
    assert [acc.offer(g, _accs(g)) for g in groups[:3]] == [True, False, True]
    assert not acc.is_full and acc.kept == 2
    assert acc.begin_round()
    acc.offer(groups[3], _accs(groups[3]))
    assert acc.is_full
    acc.offer(groups[4], _accs(groups[4]))  # an in-flight group finishing after the batch is full
    assert acc.metrics() == {"ds/generated_groups": 5.0, "ds/kept_groups": 4.0, "ds/kept_ratio": 0.8, "ds/rounds": 2.0}
    assert acc.begin_round() is False  # full: no new round
    batch = acc.take()
    assert [g.prompt_index for g in batch] == [0, 2, 3]
    assert [g.prompt_index for g in acc.surplus] == [4]
    assert acc.last_metrics == {
        "ds/generated_groups": 5.0,
        "ds/kept_groups": 4.0,
        "ds/kept_ratio": 0.8,
        "ds/rounds": 2.0,
        "ds/padded_groups": 0.0,
    }
    # The next step starts from zero.
    assert (acc.rounds, acc.generated, acc.kept, acc.kept_ratio) == (0, 0, 0, 0.0)


def test_bound_raises_with_an_actionable_message():
    acc = GroupAccumulator(target_groups=2, max_num_gen_batches=2)
    assert acc.begin_round()
    acc.offer(_group(0, ZERO), ZERO)
    assert acc.begin_round()
    acc.offer(_group(1, INFO), INFO)
    acc.offer(_group(2, [True, True]), [1.0, 1.0])
    with pytest.raises(DynamicSamplingExhausted) as info:
        acc.begin_round()
    msg = str(info.value)
    assert "2 generation rounds" in msg
    assert "1/2 groups" in msg
    assert "too easy or too hard" in msg
    assert "algo.filter_groups.max_num_gen_batches" in msg
    assert "algo.filter_groups.on_exhausted=pad" in msg
    assert acc.rounds == 2  # the refused round is not counted


def test_take_before_full_is_a_programming_error():
    acc = GroupAccumulator(target_groups=2)
    acc.begin_round()
    acc.offer(_group(0, INFO), INFO)
    with pytest.raises(RuntimeError, match="1/2") as info:
        acc.take()
    assert type(info.value) is RuntimeError


def test_unlimited_rounds_never_exhaust():
    acc = GroupAccumulator(target_groups=1, max_num_gen_batches=0)
    for i in range(50):
        assert acc.begin_round()
        acc.offer(_group(i, ZERO), ZERO)
    assert acc.rounds == 50 and not acc.exhausted


def test_pad_fallback_uses_dropped_groups_in_arrival_order():
    acc = GroupAccumulator(target_groups=3, max_num_gen_batches=1, on_exhausted="pad")
    assert acc.begin_round()
    for i, accs in enumerate([ZERO, INFO, [True, True], ZERO]):
        acc.offer(_group(i, accs), accs)
    assert acc.needs_padding  # 1 of 1 rounds used, 1 of 3 groups kept
    assert acc.begin_round() is False
    batch = acc.take()
    # kept group 1 first, then the first two dropped groups (0, 2); group 3 is not needed.
    assert [g.prompt_index for g in batch] == [1, 0, 2]
    assert acc.last_metrics["ds/padded_groups"] == 2.0
    assert acc.last_metrics["ds/kept_groups"] == 1.0


def test_pad_without_enough_groups_still_raises():
    acc = GroupAccumulator(target_groups=3, max_num_gen_batches=1, on_exhausted="pad")
    acc.begin_round()
    acc.offer(_group(0, ZERO), ZERO)
    assert acc.needs_padding
    with pytest.raises(DynamicSamplingExhausted, match="Padding needs 3 zero-variance groups but only 1"):
        acc.take()


def test_disabled_keeps_everything():
    acc = GroupAccumulator(target_groups=2, enabled=False)
    acc.begin_round()
    assert acc.offer(_group(0, ZERO), ZERO) and acc.offer(_group(1, [True, True]), [1.0, 1.0])
    assert [g.prompt_index for g in acc.take()] == [0, 1]


def test_constructor_validation():
    with pytest.raises(ValueError, match="on_exhausted"):
        GroupAccumulator(target_groups=2, on_exhausted="retry")
    with pytest.raises(ValueError, match="target_groups"):
        GroupAccumulator(target_groups=0)


EVENTS = [
    ("round",),
    ("offer", 0, ZERO),
    ("offer", 1, INFO),
    ("round",),
    ("offer", 2, INFO),
    ("offer", 3, ZERO),
    ("round",),
    ("offer", 4, [True, True]),
    ("offer", 5, INFO),
    ("offer", 6, INFO),
]


def _play(acc, events):
    for ev in events:
        if ev[0] == "round":
            assert acc.begin_round()
        else:
            acc.offer(_group(ev[1], ev[2]), ev[2])


@pytest.mark.parametrize("on_exhausted", ["error", "pad"])
def test_state_round_trip_mid_step(on_exhausted):
    kw = {"target_groups": 3, "max_num_gen_batches": 3, "on_exhausted": on_exhausted}
    original = GroupAccumulator(**kw)
    _play(original, EVENTS[:5])
    state = original.state_dict()
    assert {k: type(v).__name__ for k, v in state.items()} == {
        "rounds": "int",
        "generated": "int",
        "kept": "list",
        "dropped": "list",
        "surplus": "list",
        "last_metrics": "dict",
    }
    restored = GroupAccumulator(**kw)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert (
        restored.metrics()
        == original.metrics()
        == {"ds/generated_groups": 3.0, "ds/kept_groups": 2.0, "ds/kept_ratio": 2 / 3, "ds/rounds": 2.0}
    )
    for acc in (original, restored):
        _play(acc, EVENTS[5:])
    assert restored.metrics() == original.metrics()
    assert restored.take() == original.take()  # dataclass equality: same groups, same order
    assert restored.surplus == original.surplus and len(restored.surplus) == 1
    assert restored.last_metrics == original.last_metrics

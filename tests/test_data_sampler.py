"""ResumableSampler: seeded permutations per epoch, epoch crossing, exact resume."""

from __future__ import annotations

import json

import pytest

from dapo_megatron.data import ResumableSampler


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = ResumableSampler(50, seed=7).next_indices(120)
    b = ResumableSampler(50, seed=7).next_indices(120)
    c = ResumableSampler(50, seed=8).next_indices(120)
    assert a == b
    assert a != c
    assert a[:50] != list(range(50))  # shuffled


def test_each_epoch_is_a_new_permutation_and_crossing_is_seamless():
    s = ResumableSampler(10, seed=3)
    first = s.next_indices(7)
    assert (s.epoch, s.position) == (0, 7)
    cross = s.next_indices(6)  # 3 from epoch 0, 3 from epoch 1
    assert (s.epoch, s.position) == (1, 3)
    rest = s.next_indices(7)
    assert (s.epoch, s.position) == (2, 0)
    epoch0, epoch1 = first + cross[:3], cross[3:] + rest
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    # drawing one big chunk gives the same sequence as drawing in pieces
    assert ResumableSampler(10, seed=3).next_indices(20) == epoch0 + epoch1
    # k larger than several epochs
    many = ResumableSampler(4, seed=0).next_indices(13)
    assert [sorted(many[i : i + 4]) for i in (0, 4, 8)] == [[0, 1, 2, 3]] * 3


def test_no_shuffle_is_in_order():
    s = ResumableSampler(4, seed=1, shuffle=False)
    assert s.next_indices(6) == [0, 1, 2, 3, 0, 1]
    assert s.next_indices(0) == []


def test_state_round_trip_mid_epoch_continues_identically():
    ref = ResumableSampler(23, seed=11)
    ref.next_indices(17)
    state = json.loads(json.dumps(ref.state_dict()))  # survives JSON
    assert state["epoch"] == 0 and state["position"] == 17
    expected = ref.next_indices(60)

    resumed = ResumableSampler(23, seed=11)
    resumed.next_indices(5)  # some other state, to be overwritten
    resumed.load_state_dict(state)
    assert resumed.next_indices(60) == expected

    # mid-epoch in a later epoch too
    ref2 = ResumableSampler(23, seed=11)
    ref2.next_indices(50)
    st = ref2.state_dict()
    fresh = ResumableSampler(23, seed=11)
    fresh.load_state_dict(st)
    assert (fresh.epoch, fresh.position) == (2, 4)
    assert fresh.next_indices(30) == ref2.next_indices(30)


def test_load_state_rejects_mismatch():
    s = ResumableSampler(10, seed=1)
    state = ResumableSampler(12, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_items=12 but this sampler has num_items=10"):
        s.load_state_dict(state)
    with pytest.raises(ValueError, match="seed=2"):
        s.load_state_dict(ResumableSampler(10, seed=2).state_dict())
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({"epoch": 0, "position": 10})
    with pytest.raises(ValueError, match="at least one item"):
        ResumableSampler(0, seed=1)


def test_empty_dataset_and_changed_dataset_name_the_config_keys():
    # the loader refuses an empty dataset first (naming the files); this guard says where to look
    with pytest.raises(ValueError, match=r"num_items=0.*data\.train_files"):
        ResumableSampler(0, seed=1)
    saved = ResumableSampler(12, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"num_items=12 .*num_items=10.*data\.train_files"):
        ResumableSampler(10, seed=1).load_state_dict(saved)

"""The first-step check that the trainer's weights reached the engines (controller/loop.py)."""

from types import SimpleNamespace

import pytest

from dapo_megatron.config import Config, RolloutConfig, RunConfig
from dapo_megatron.controller.loop import check_weights_arrived


def session(bound=0.05, replay=""):
    cfg = Config(
        rollout=RolloutConfig(engine="sglang", weight_check_max_gap=bound), run=RunConfig(replay_rollouts=replay)
    )
    return SimpleNamespace(cfg=cfg, rank0=True)


def test_weights_that_arrived_pass_and_the_gap_is_printed(capsys):
    check_weights_arrived(session(), {"rollout/logprob_gap_mean": 2e-4, "rollout/logprob_gap_max": 8e-4})
    out = capsys.readouterr().out
    assert "weight check (first step)" in out and "0.0002" in out and "bound 0.05" in out


def test_weights_that_did_not_arrive_stop_the_run_with_a_named_error():
    # The gap of a server still on its random start-up weights: nats, not thousandths.
    with pytest.raises(RuntimeError, match="rollout.weight_check_max_gap=0.05.*did not reach the sglang engines"):
        check_weights_arrived(session(), {"rollout/logprob_gap_mean": 1.7, "rollout/logprob_gap_max": 6.0})
    with pytest.raises(RuntimeError):  # a NaN gap is no evidence of arrival either
        check_weights_arrived(session(), {"rollout/logprob_gap_mean": float("nan"), "rollout/logprob_gap_max": 0.0})


def test_nothing_to_compare_when_the_rollout_logprobs_are_reused_or_replayed():
    check_weights_arrived(session(), {})  # algo.use_rollout_logprobs: no recomputation, no gap
    check_weights_arrived(session(replay="dump"), {"rollout/logprob_gap_mean": 9.0, "rollout/logprob_gap_max": 9.0})

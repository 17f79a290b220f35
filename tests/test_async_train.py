"""Asynchronous DAPO (rollout.max_staleness >= 1) through the real command line: the producer overlaps
the next step's generation with training within the staleness bound, and a run SIGKILLed mid-step
resumes its partial rollouts from the checkpoint, bit for bit the uninterrupted run."""

import pytest
import torch

from dapo_megatron.config_io import load_config
from dapo_megatron.controller.session import check_async
from dapo_megatron.observability.sinks import read_metrics
from tests.cli_runs import TINY, run_cli, write_demo_assets
from tests.test_controller_train import _export, _run_killed_after

ASYNC = ("rollout.max_staleness=1", "algo.tis.enable=true", "run.eval_every=0")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_demo_assets(tmp_path_factory.mktemp("demo_assets"))


def test_refused_combinations_name_their_keys():
    ok = ["rollout.max_staleness=2", "algo.tis.enable=true"]
    check_async(load_config(None, ok))
    check_async(load_config(None, ["rollout.max_staleness=0", "algo.use_rollout_logprobs=true"]))  # K=0: as before
    for extra, key in [
        (["algo.use_rollout_logprobs=true"], "algo.use_rollout_logprobs"),
        (["algo.tis.enable=false"], "algo.tis.enable"),
        (["rollout.mode=colocated", "rollout.offload_trainer=true"], "rollout.offload_trainer"),
        (["run.replay_rollouts=somewhere"], "run.replay_rollouts"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
            check_async(load_config(None, [*ok, *extra]))
        assert "rollout.max_staleness=2" in str(e.value)


def test_overlapped_producer_stays_within_the_bound_and_trains_its_head_start(assets, tmp_path):
    run = tmp_path / "run"
    run_cli(assets, "train", "--config", TINY, f"run.dir={run}", "train.total_steps=3", *ASYNC)
    records = read_metrics(str(run))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        # every token trained at step t came from version t-1 or t-2 (K = 1), and the counts add up
        assert r["staleness/max"] <= 1
        assert r["staleness/count_0"] + r["staleness/count_1"] == r["actor/num_tokens"]
        assert r["async/head_start_tokens"] > 0  # generation ran while the actor trained
        assert "tis/weight_mean" in r and "tis/capped_frac" in r  # the correction ran and is logged
    assert records[0]["staleness/max"] == 0  # step 1 has nothing ahead: on-policy
    # the head start's tokens (drawn by the previous weights) trained at the next step. Whether its
    # groups were still in flight at the sync, and so continued as partials, depends on how fast the
    # machine is (on an idle one they may all finish first): the fixed-interleave resume test below
    # pins continuation down.
    assert all(r["staleness/count_1"] > 0 for r in records[1:])


def test_sigkill_mid_async_step_resumes_partials_bitwise(assets, tmp_path):
    # groups decode concurrently (completion order is timing); they are offered in submission order
    steps = ["train.total_steps=4", "rollout.async_interleave=fixed", "rollout.max_concurrency=4", *ASYNC]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(assets, "train", "--config", TINY, f"run.dir={straight}", *steps)
    args = ["train", "--config", TINY, f"run.dir={killed}", *steps]
    # after step 3 trained: the checkpoint of step 2 holds step 3's head start (groups in progress)
    _run_killed_after(assets, "train", 3, args, tmp_path / "killed.log")
    assert [r["step"] for r in read_metrics(str(killed))] == [1, 2]
    run_cli(assets, *args)
    ra, rb = read_metrics(str(straight)), read_metrics(str(killed))
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    resumed = rb[2]  # the first step after the resume continued the saved trajectories
    assert resumed["async/continued_groups"] > 0 and resumed["async/mixed_version_samples"] > 0
    assert resumed["async/regenerated_stale_groups"] == 0
    for key in ("reward/mean", "actor/grad_norm", "staleness/count_1", "async/head_start_tokens"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    a = _export(assets, straight / "checkpoints" / "step_000004", tmp_path / "a")
    b = _export(assets, killed / "checkpoints" / "step_000004", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""The training loop end to end, through the real command line: megatron actor, embedded engine,
weight sync, dynamic sampling, checkpoints, resume after SIGKILL, export and plot."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.observability import metric_names as M
from dapo_megatron.observability.sinks import read_metrics
from tests.cli_runs import BIN, REPO, TINY, cli_env, run_cli, write_demo_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_demo_assets(tmp_path_factory.mktemp("demo_assets"))


def _train(assets, run_dir, *overrides, timeout=300):
    return run_cli(assets, "train", "--config", TINY, f"run.dir={run_dir}", *overrides, timeout=timeout)


def _export(assets, ckpt, out):
    run_cli(assets, "export", "--ckpt", str(ckpt), "--hf-dir", str(assets / "model"), "--out", str(out),
         "--dtype", "float32", "--no-progress")  # fmt: skip
    return load_file(str(next(Path(out).glob("*.safetensors"))))


TINY_RUN = ("train.total_steps=3", "train.ppo_mini_batch_size=4")


@pytest.fixture(scope="module")
def tiny_run(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    # One update per step, so step 1's update starts exactly at the rollout policy.
    _train(assets, run, *TINY_RUN, "run.keep_checkpoints=3", "run.dump_rollouts=true")
    return run


def test_every_step_logs_every_metric_and_advances_the_engine(tiny_run):
    records = read_metrics(str(tiny_run))
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    needed = set(M.ALL_KEYS) - {M.EVAL_ACC}
    for r in steps:
        assert needed <= set(r), f"step {r['step']} lacks {sorted(needed - set(r))}"
        assert r["sync/weight_version"] == r["step"]  # the engine serves the weights of this step
        assert r["rollout/stale_samples"] == 0  # and sampled with the previous step's, i.e. on-policy
        assert r["actor/tokens_per_s"] > 0 and r["actor/updates"] == 1
    evals = [r["step"] for r in records if M.EVAL_ACC in r]
    assert evals == [0, 2, 3]  # before training, every eval_every=2 steps, and at the end


def test_first_step_is_on_policy(tiny_run):
    first = read_metrics(str(tiny_run))[1]
    assert first["step"] == 1
    assert first["rollout/logprob_gap_max"] <= 1e-4  # trainer recomputation == engine sampling logprobs
    assert abs(first["actor/approx_kl"]) <= 1e-6
    assert first["actor/clip_frac_high"] == 0 and first["actor/clip_frac_low"] == 0


def test_rollout_logprobs_as_pi_old_still_check_the_weights_at_the_first_step(assets, tmp_path):
    """``algo.use_rollout_logprobs``: step 1 recomputes pi_old anyway (the weight check needs the gap,
    and it is on-policy); step 2 trusts the engine's log-probs and runs no log-prob pass."""
    run = tmp_path / "run"
    _train(assets, run, "train.total_steps=2", "train.ppo_mini_batch_size=4", "run.eval_every=0",
           "algo.use_rollout_logprobs=true")  # fmt: skip
    first, second = read_metrics(str(run))
    assert (first["step"], second["step"]) == (1, 2)
    assert first["rollout/logprob_gap_max"] <= 1e-4 and abs(first["actor/approx_kl"]) <= 1e-6
    assert "rollout/logprob_gap_mean" not in second
    assert second["time/logprob_s"] < 0.1 * first["time/logprob_s"]


def test_run_dir_has_config_checkpoints_and_the_weights_changed(tiny_run, assets, tmp_path):
    assert (tiny_run / "config.yaml").read_text().count("total_steps: 3") == 1
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000001", "step_000002", "step_000003"]
    first = _export(assets, tiny_run / "checkpoints" / "step_000001", tmp_path / "s1")
    last = _export(assets, tiny_run / "checkpoints" / "step_000003", tmp_path / "s3")
    assert first.keys() == last.keys()
    changed = [k for k in first if not torch.equal(first[k], last[k])]
    assert len(changed) == len(first), f"unchanged tensors: {sorted(set(first) - set(changed))}"


def test_plot_writes_nonempty_pngs(tiny_run, assets, tmp_path):
    out = run_cli(assets, "plot", str(tiny_run), "--out", str(tmp_path / "plots")).stdout.split()
    assert out and all(p.endswith(".png") and os.path.getsize(p) > 1000 for p in out)


def _wait_for_checkpoint(proc, latest, name, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if latest.exists() and latest.read_text().strip() >= name:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before {name} was saved")
        time.sleep(0.05)
    pytest.fail(f"{name} was not saved within {timeout_s} s")


def test_sigkill_then_resume_is_bitwise_identical(assets, tmp_path):
    # Four groups decode at once: which finishes first is timing, but groups are offered in submission
    # order and the embedded engine's rows do not see each other, so both runs draw the same batches.
    steps = ["train.total_steps=5", "run.eval_every=0", "rollout.max_concurrency=4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train(assets, straight, *steps)
    args = [*BIN, "train", "--config", TINY, f"run.dir={killed}", *steps]
    # Its own process group, killed whole: like a node failure, which takes the trainer's helper
    # processes (megatron's checkpoint writer) down with it, so none is left behind.
    proc = subprocess.Popen(args, env=cli_env(assets), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for_checkpoint(proc, killed / "checkpoints" / "latest", "step_000002", timeout_s=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    interrupted_at = read_metrics(str(killed))[-1]["step"]
    assert interrupted_at < 5, "the run finished before it was killed; the test proves nothing"
    _train(assets, killed, *steps)
    a = _export(assets, straight / "checkpoints" / "step_000005", tmp_path / "a")
    b = _export(assets, killed / "checkpoints" / "step_000005", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_metrics(str(straight)), read_metrics(str(killed))
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5]  # lines logged after the checkpoint were rewound
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]


def test_bad_inputs_fail_with_a_named_error(assets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1"}]}) + "\n")
    done = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'r'}", f"data.train_files=[{bad}]"],
                          env=cli_env(assets), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "reward_model" in done.stderr and str(bad) in done.stderr
    done = subprocess.run([*BIN, "train", "--config", TINY, "model.hf_path=/nonexistent"],
                          env=cli_env(assets), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "model.hf_path='/nonexistent'" in done.stderr


def test_replayed_rollouts_reproduce_the_run_without_engines(tiny_run, assets, tmp_path):
    rollouts = tiny_run / "rollouts"
    assert sorted(p.name for p in rollouts.iterdir()) == ["step_1.jsonl", "step_2.jsonl", "step_3.jsonl"]
    replayed = tmp_path / "replayed"
    _train(assets, replayed, *TINY_RUN, "run.eval_every=0", f"run.replay_rollouts={rollouts}")
    records = read_metrics(str(replayed))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/replayed"] == 1 and "sync/weight_version" not in r for r in records)  # no engine ran
    original = [r for r in read_metrics(str(tiny_run)) if r["step"] > 0]
    assert [r["reward/mean"] for r in records] == [r["reward/mean"] for r in original]
    a = _export(assets, tiny_run / "checkpoints" / "step_000003", tmp_path / "a")
    b = _export(assets, replayed / "checkpoints" / "step_000003", tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same updates, bit for bit


def test_replay_past_the_dump_names_the_missing_step(assets, tmp_path):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    done = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'r'}", "train.total_steps=1",
                           f"run.replay_rollouts={rollouts}"],
                          env=cli_env(assets), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "step_1.jsonl" in done.stderr and "run.replay_rollouts" in done.stderr


# (phase, step) crash points, in order; each resume restarts from the last checkpoint, so the chain
# is deterministic. Step 0's eval line before any checkpoint, a step's line logged but its checkpoint
# not yet published, and a checkpoint saved right after an evaluation are all among them.
CRASHES = [("log", 0), ("generate", 1), ("log", 1), ("train", 2), ("sync", 2), ("eval", 2), ("log", 2), ("save", 2)]


def _run_killed_after(assets, phase, step, args, log):
    """``dapo-megatron *args`` that SIGKILLs itself after ``phase`` of ``step`` (output into ``log``)."""
    with open(log, "w") as out:  # a file: helpers outliving the kill would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_at_phase.py"), phase, str(step), *args],
                                env=cli_env(assets), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its helpers (checkpoint writer) go down with it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed after {phase} of step {step}:\n{log.read_text()[-3000:]}"


def test_killed_at_every_phase_boundary_logs_each_step_once_and_matches_the_straight_run(tiny_run, assets, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", TINY, f"run.dir={run}", *TINY_RUN, "run.keep_checkpoints=3",
            "run.dump_rollouts=true"]  # fmt: skip  # the config of tiny_run, the straight reference
    for phase, step in CRASHES:
        _run_killed_after(assets, phase, step, args, tmp_path / f"{phase}_{step}.log")
    run_cli(assets, *args)
    records = read_metrics(str(run))
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # every step exactly once, in order
    straight = read_metrics(str(tiny_run))
    for key in ("reward/mean", "actor/grad_norm", M.EVAL_ACC):
        assert [r.get(key) for r in records] == [r.get(key) for r in straight], key

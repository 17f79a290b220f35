"""`dapo-megatron demo` in CI: the same code as the README's main command with fewer RL steps.

Asserted: DAPO itself raises held-out accuracy over the warm-up's, and the exported HF model
evaluated through a fresh engine scores what the trainer's last evaluation did.
"""

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_demo_learns_and_the_export_reproduces_the_final_accuracy(tmp_path):
    run = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(25000 + os.getpid() % 2000))
    cmd = [sys.executable, "-m", "dapo_megatron", "demo", f"run.dir={run}", "train.total_steps=40",
           "run.eval_every=40", "run.save_every=40"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((run / "demo_summary.json").read_text())
    before, after = summary["demo/acc_before_rl"], summary["demo/acc_after_rl"]
    # 200 held-out problems: a gain of 0.08 is ~2.5 standard errors of one evaluation.
    assert after >= before + 0.08, summary
    assert abs(summary["demo/acc_exported"] - after) <= 0.03, summary
    assert "demo/acc_after_rl" in done.stdout


def _demo(run, steps, assets_env):
    from tests.cli_runs import TINY

    done = subprocess.run([sys.executable, "-m", "dapo_megatron", "demo", "--config", TINY, f"run.dir={run}",
                           f"train.total_steps={steps}", "demo.sft_steps=2", "demo.sft_batch_size=4",
                           "run.keep_checkpoints=1", "run.eval_every=1"],
                          env=assets_env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((run / "demo_summary.json").read_text())


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def test_demo_rerun_with_more_steps_exports_and_scores_the_checkpoint_it_evaluated(tmp_path):
    """Tiny: 2 warm-up updates, 1 then 2 DAPO steps. The re-run's export is the step-2 checkpoint, in
    its own folder, bit for bit; the step-1 export is not reused."""
    from tests.cli_runs import cli_env, run_cli

    run, env = tmp_path / "demo", cli_env(tmp_path)  # the tiny config names ${DEMO_ASSETS}; the demo writes its own
    assert _demo(run, 1, env)["demo/exported_step"] == 1
    summary = _demo(run, 2, env)
    assert summary["demo/exported_step"] == 2
    assert sorted(os.listdir(run / "export")) == ["step_000001", "step_000002"]  # no tmp folder left behind
    run_cli(tmp_path, "export", "--ckpt", str(run / "checkpoints" / "step_000002"), "--hf-dir",
            str(run / "assets" / "model"), "--out", str(tmp_path / "direct"), "--dtype", "float32",
            "--no-progress")  # fmt: skip
    ours, direct = _weights(run / "export" / "step_000002"), _weights(tmp_path / "direct")
    assert ours.keys() == direct.keys() and all(torch.equal(ours[k], direct[k]) for k in ours)
    old = _weights(run / "export" / "step_000001")
    assert any(not torch.equal(old[k], ours[k]) for k in ours)  # the re-run did move the weights

"""`dapo-megatron demo` in CI: the same code as the README's main command with fewer RL steps.

Asserted: DAPO itself raises held-out accuracy over the warm-up's, and the exported HF model
evaluated through a fresh engine scores what the trainer's last evaluation did.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


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

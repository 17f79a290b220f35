"""Running ``dapo-megatron`` the way a user does (a subprocess of this interpreter) on the tiny demo task.

Shared by the end-to-end tests of the training loop (embedded engine) and of the vLLM engine.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
BIN = [sys.executable, "-m", "dapo_megatron"]


def cli_env(assets) -> dict:
    """One thread per process, the demo assets folder, and no torchrun variables leaking in from outside."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DEMO_ASSETS=str(assets))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    env["MASTER_PORT"] = str(23000 + os.getpid() % 2000)
    return env


def run_cli(assets, *args, timeout=300) -> subprocess.CompletedProcess:
    """``dapo-megatron *args``; fails the test with the command's output tails when it exits non-zero."""
    done = subprocess.run([*BIN, *args], env=cli_env(assets), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def write_demo_assets(out) -> Path:
    """The tiny demo's model folder and parquet files under ``out`` (``demo --assets-only``)."""
    run_cli(out, "demo", "--assets-only", str(out), "--config", TINY)
    return Path(out)

"""Engine servers never outlive the trainer that started them.

* The SGLang start-up shim asks the kernel to SIGTERM a server when its parent dies, even by SIGKILL
  (checked here on a plain Python process that loads the shim the way a server does).
* `dapo-megatron train` turns SIGTERM into a normal unwind (exit 143), so the session closes its engines.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

from dapo_megatron.rollout.sglang_server import SHIM_DIR
from tests.cli_runs import BIN, TINY, cli_env, write_demo_assets

# A parent that starts one child with the shim on its path (as SGLangServer does), prints the child's
# PID, then sleeps until it is killed.
PARENT = f"""
import os, subprocess, sys, time
env = dict(os.environ, PYTHONPATH={SHIM_DIR!r}, DAPO_SGLANG_PARENT_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env, start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":  # exited; waiting for init to reap it
                return True
        time.sleep(0.1)
    return False


def test_a_server_process_dies_with_the_parent_that_started_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(3)  # the child's start-up (torch import in the shim) is done
        assert not _gone(child, 0.5), "the child must live while its parent does"
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
        assert _gone(child, 20), "the shim's parent-death signal did not stop the child"
    finally:
        parent.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_sigterm_ends_a_training_run_through_its_cleanup(tmp_path):
    assets = write_demo_assets(tmp_path / "assets")
    args = [*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'run'}", "train.total_steps=50"]
    proc = subprocess.Popen(args, env=cli_env(assets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the loop is under way
        if line.startswith("step 1 "):
            break
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # sys.exit from the handler, not death by signal (-15)

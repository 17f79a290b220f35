"""One writer per run folder: the run lock, taken by real processes.

A second `train` into a live run's folder must be refused (naming the folder and the holder's pid and
host) instead of resuming from the live run's checkpoint; the lock dies with its holder, and children
forked by the holder (megatron's checkpoint writer) do not keep it alive.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dapo_megatron.controller.run_dir import LOCK_FILE, RunDirError, lock_run_dir, prepare_run_dir
from dapo_megatron.observability.sinks import read_metrics
from tests.cli_runs import BIN, TINY, cli_env, write_demo_assets

# Locks the folder, optionally forks a child that outlives it, reports, then waits to be killed.
_HOLDER = """
import os, sys, time
from dapo_megatron.controller.run_dir import lock_run_dir
lock = lock_run_dir(sys.argv[1])
child = os.fork() if sys.argv[2] == "fork" else -1
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def _start_holder(folder, mode="plain"):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), mode], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    child = int(proc.stdout.readline())  # the lock is held once the line arrives
    return proc, child


def _kill(pid):
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signal.SIGKILL)


def test_second_locker_is_refused_with_folder_pid_and_host_and_the_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(str(run), resume=False)
    holder, _ = _start_holder(run)
    try:
        with pytest.raises(RunDirError) as refused:
            lock_run_dir(str(run))
        text = str(refused.value)
        assert str(run) in text and f"pid {holder.pid}" in text and socket.gethostname() in text
    finally:
        _kill(holder.pid)
        holder.wait()
    lock = lock_run_dir(str(run))  # the holder died: no stale lock to clean up by hand
    assert (run / LOCK_FILE).read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]
    lock.release()
    lock_run_dir(str(run)).release()  # released: free again


def test_a_forked_child_of_the_holder_does_not_keep_the_lock(tmp_path):
    run = tmp_path / "run"
    holder, child = _start_holder(run, "fork")
    try:
        _kill(holder.pid)
        holder.wait()
        os.kill(child, 0)  # the child is still alive ...
        lock_run_dir(str(run)).release()  # ... and does not hold the lock
    finally:
        _kill(child)


def test_lock_refuses_a_foreign_folder_before_writing_into_it(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="not a dapo_megatron run"):
        lock_run_dir(str(tmp_path / "home"))
    assert os.listdir(tmp_path / "home") == ["thesis.tex"]


def _wait_for_line(metrics, step, proc, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.isfile(metrics) and any(r["step"] >= step for r in read_metrics(os.path.dirname(metrics))):
            return
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.1)
    pytest.fail(f"step {step} was not logged within {timeout_s} s")


def test_second_train_into_a_live_run_folder_is_refused(tmp_path):
    assets = write_demo_assets(tmp_path / "assets")
    run = tmp_path / "run"
    steps = ("train.total_steps=100000", "run.eval_every=0")  # still running when the second one comes
    env, log = cli_env(assets), tmp_path / "first.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the first run
        first = subprocess.Popen([*BIN, "train", "--config", TINY, f"run.dir={run}", *steps], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_for_line(str(run / "metrics.jsonl"), 1, first)
        other = dict(env, MASTER_PORT=str(int(env["MASTER_PORT"]) + 1))
        second = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={run}", *steps], env=other,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert str(run) in second.stderr and f"pid {first.pid}" in second.stderr
        assert socket.gethostname() in second.stderr
        assert first.poll() is None, log.read_text()[-3000:]  # the live run was not disturbed ...
        logged = read_metrics(str(run))[-1]["step"]
        _wait_for_line(str(run / "metrics.jsonl"), logged + 2, first)  # ... and goes on stepping
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    steps_logged = [r["step"] for r in read_metrics(str(run))]
    assert steps_logged == list(range(1, len(steps_logged) + 1))


def test_every_rank_stops_at_once_when_rank0_refuses_the_folder(tmp_path):
    """Two ranks (launched as srun does: plain processes, no agent that kills the survivors) into a
    locked folder: rank 0 is refused, and rank 1 must stop at once saying why. Before, rank 1 died
    in its next collective with gloo's "remote worker crashed" traceback (under NCCL it would wait
    for the process-group timeout)."""
    assets = write_demo_assets(tmp_path / "assets")
    run = tmp_path / "run"
    prepare_run_dir(str(run), resume=False)
    holder, _ = _start_holder(run)
    rdzv = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(22000 + os.getpid() % 2000), "WORLD_SIZE": "2"}
    args = [*BIN, "train", "--config", TINY, f"run.dir={run}", "parallel.tensor=2"]
    try:
        start = time.monotonic()
        ranks = [subprocess.Popen(args, env={**cli_env(assets), **rdzv, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]  # fmt: skip
        outs = [p.communicate(timeout=400) for p in ranks]
        took = time.monotonic() - start
    finally:
        _kill(holder.pid)
        holder.wait()
    assert [p.returncode for p in ranks] == [2, 2], outs
    assert f"pid {holder.pid}" in outs[0][1] and "Traceback" not in outs[0][1]  # rank 0's refusal, one line
    assert "trainer rank 0 could not open the run" in outs[1][1] and f"pid {holder.pid}" in outs[1][1]
    assert took < 300, f"the ranks took {took:.0f} s to stop"
    print(f"2 ranks stopped {took:.1f} s after launch when rank 0 was refused")

"""Rendezvous of a `train` process: a lone process with no MASTER_PORT takes any free port (another job
on 29500 does not stop it), and a rendezvous that fails names MASTER_ADDR/MASTER_PORT in one line."""

import contextlib
import errno
import socket
import subprocess

import pytest

from dapo_megatron.parallel.init import ANY_FREE_PORT, DistEnv, dist_env_from_environ
from tests.cli_runs import BIN, TINY, cli_env, write_demo_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_demo_assets(tmp_path_factory.mktemp("demo_assets"))


@contextlib.contextmanager
def _held(port):
    """Listen on ``port`` on every address for the duration (already taken by someone else: also held)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
            s.listen()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        yield


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lone_process_without_master_port_asks_for_any_free_port():
    assert dist_env_from_environ({}) == DistEnv(0, 1, 0, "127.0.0.1", ANY_FREE_PORT)
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert dist_env_from_environ(slurm).master_port == ANY_FREE_PORT  # one task: nobody to agree with
    with pytest.raises(ValueError, match="master_port"):
        DistEnv(0, 2, 0, "a", ANY_FREE_PORT)  # several ranks must agree on a port in advance


def test_single_process_train_works_while_29500_is_held(assets, tmp_path):
    env = cli_env(assets)
    env.pop("MASTER_PORT")  # the launcher sets none, as in a plain `dapo-megatron train`
    with _held(29500):
        done = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'run'}", "train.total_steps=1",
                               "run.eval_every=0"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_busy_explicit_master_port_is_a_named_one_line_error(assets, tmp_path):
    port = _free_port()
    env = dict(cli_env(assets), MASTER_PORT=str(port))
    with _held(port):
        done = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'run'}"], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "rendezvous" in done.stderr and f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in done.stderr


_REINIT = """
import os, sys
from dapo_megatron.parallel.init import init_distributed, init_model_parallel, shutdown
from dapo_megatron.parallel.topology import Topology
for _ in range(2):
    env = init_distributed()
    init_model_parallel(Topology(world_size=1, tp=1, pp=1), seed=0)
    print(env.master_port, flush=True)
    shutdown()
"""


def test_a_second_init_in_one_process_on_the_same_master_port_works():
    """The demo initialises twice in one process (warm-up, then DAPO). megatron's groups keep the first
    store alive after shutdown, so the second rendezvous on an explicit MASTER_PORT must reuse its
    server instead of failing to bind the port it already holds."""
    import os
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, "-c", _REINIT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(port), str(port)]

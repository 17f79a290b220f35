"""Launcher environment parsing (pure): torchrun, SLURM, single process, partial environments."""

import pytest

from dapo_megatron.parallel.init import (
    ANY_FREE_PORT,
    DEFAULT_MASTER_PORT,
    DistEnv,
    dist_env_from_environ,
    first_host_of_nodelist,
)


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29999"}
    assert dist_env_from_environ(env) == DistEnv(3, 8, 1, "node7", 29999)


def test_torchrun_wins_over_slurm():
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "n[1-4]",
    }
    assert dist_env_from_environ(env) == DistEnv(1, 2, 1, "a", 1234)


def test_slurm_compressed_nodelist():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-03,07],gpu5"}
    assert dist_env_from_environ(env) == DistEnv(5, 16, 1, "node01", DEFAULT_MASTER_PORT)


def test_slurm_port_and_addr_overrides():
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu5",
        "MASTER_PORT": "30001",
    }
    assert dist_env_from_environ(env) == DistEnv(0, 2, 0, "gpu5", 30001)
    assert dist_env_from_environ({**env, "MASTER_ADDR": "10.0.0.9"}).master_addr == "10.0.0.9"


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-03,07],gpu5", "node01"),
        ("gpu5,node[1-2]", "gpu5"),
        ("localhost", "localhost"),
        ("node[7,3-4]", "node7"),
        ("rack[2-3]-n[004-005]", "rack2-n004"),
        ("  a-b.c[10-12]  ", "a-b.c10"),
    ],
)
def test_first_host_of_nodelist(nodelist, first):
    assert first_host_of_nodelist(nodelist) == first


@pytest.mark.parametrize("bad", ["", "node[01-03", "node]1[", "node[a-b]"])
def test_malformed_nodelist(bad):
    with pytest.raises(ValueError):
        first_host_of_nodelist(bad)


def test_single_process_default_is_any_free_port():
    assert dist_env_from_environ({}) == DistEnv(0, 1, 0, "127.0.0.1", ANY_FREE_PORT)
    assert dist_env_from_environ({"MASTER_PORT": "23456"}).master_port == 23456


def test_partial_torchrun_names_missing():
    with pytest.raises(
        ValueError, match=r"partial torchrun environment: RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
    ):
        dist_env_from_environ({"RANK": "0"})


def test_partial_slurm_names_missing():
    with pytest.raises(ValueError, match=r"partial SLURM environment: .*SLURM_JOB_NODELIST missing"):
        dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})


def test_non_integer_and_out_of_range():
    base = {"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        dist_env_from_environ(base)
    with pytest.raises(ValueError, match=r"rank=2 is outside \[0, world_size=2\)"):
        dist_env_from_environ({**base, "RANK": "2"})
    with pytest.raises(ValueError, match="not a TCP port"):
        dist_env_from_environ({**base, "RANK": "0", "MASTER_PORT": "70000"})


def test_local_rank_defaults_to_rank():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1234"}
    assert dist_env_from_environ(env).local_rank == 1

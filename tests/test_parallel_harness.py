"""The multi-process test harness itself."""

import os
import time

import pytest

from tests.distributed_harness import DistributedFailure, DistributedTimeout, run_distributed


def _report_env(rank, world_size, tag):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # env:// from the harness variables
    t = __import__("torch").tensor([rank + 1.0])
    dist.all_reduce(t)
    dist.destroy_process_group()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "OMP_NUM_THREADS")
    return tag, {k: os.environ[k] for k in keys}, float(t)


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise KeyError("boom from rank one")
    return rank


def _sleep_forever(rank, world_size):
    time.sleep(600)


@pytest.mark.multiproc
def test_results_in_rank_order_with_env():
    out = run_distributed(_report_env, 2, "hi", timeout_s=120)
    assert [o[0] for o in out] == ["hi", "hi"]
    assert [o[1]["RANK"] for o in out] == ["0", "1"]
    assert all(o[1]["WORLD_SIZE"] == "2" and o[1]["OMP_NUM_THREADS"] == "1" for o in out)
    assert [o[1]["LOCAL_RANK"] for o in out] == ["0", "1"]
    assert [o[2] for o in out] == [3.0, 3.0]


@pytest.mark.multiproc
def test_rank_exception_carries_traceback():
    with pytest.raises(DistributedFailure, match=r"(?s)rank 1 of 2 raised:.*KeyError: 'boom from rank one'"):
        run_distributed(_raise_on_rank_one, 2, timeout_s=120)


@pytest.mark.multiproc
def test_timeout_kills_ranks():
    start = time.monotonic()
    with pytest.raises(DistributedTimeout, match=r"ranks \[0\] did not finish within 3 s"):
        run_distributed(_sleep_forever, 1, timeout_s=3)
    assert time.monotonic() - start < 60

"""Ranks other than 0 wait out rank 0's rollout on the rendezvous store, not in a collective.

The main test trains one real step of the tiny demo on 2 gloo ranks with
``parallel.collective_timeout_s=2`` while rank 0's rollout takes 10 s. The tiny model generates in
well under a second, so the rollout is slowed on purpose: a real rollout at 20k-token responses
takes tens of minutes, and what matters is only that it outlasts the collective timeout. The sleep
is injected at the loop's rollout seam (``loop._generate_or_replay``, the one a dumped-rollout
replay uses), in the test's rank processes only; the product is unchanged. A control shows that
the 2 s timeout is live: a collective that waits 4 s for rank 0 fails, as the former
``broadcast_object_list`` wait did.

Rank 0's failure reaches the others as an error: its exception as :class:`Rank0Failed`, its death
(the store server goes with it) as :class:`Rank0LostError`.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.cli_runs import TINY, write_demo_assets
from tests.distributed_harness import DistributedFailure, run_distributed

pytestmark = pytest.mark.multiproc

ROLLOUT_S = 10.0
TIMEOUT_S = 2


def _slow_rollout_step(rank: int, world: int, assets: str, run_dir: str) -> dict:
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller import loop

    os.environ["DEMO_ASSETS"] = assets
    cfg = load_config(TINY, [f"run.dir={run_dir}", f"parallel.collective_timeout_s={TIMEOUT_S}",
                             "train.total_steps=1", "run.eval_every=0", "run.save_every=0"])  # fmt: skip
    inner = loop._generate_or_replay
    took = {}

    def slow(s, step):  # stands in for a long real rollout (see the module docstring)
        start = time.monotonic()
        out = inner(s, step)
        time.sleep(max(0.0, ROLLOUT_S - (time.monotonic() - start)))
        took[step] = time.monotonic() - start
        return out

    loop._generate_or_replay = slow
    start = time.monotonic()
    metrics = loop.train(cfg, console=False)  # leaves the default group for the control below
    return {"metrics": metrics, "rollout_s": took.get(1), "train_s": time.monotonic() - start}


def _collective_wait_times_out(rank: int, world: int) -> str:
    """A 2 s world; rank 0 joins a broadcast 4 s late: the waiting side must fail."""
    import torch.distributed as dist

    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed(timeout_s=TIMEOUT_S)
    box = [None]
    try:
        if dist.get_rank() == 0:
            time.sleep(2 * TIMEOUT_S)
        dist.broadcast_object_list(box, src=0)
        return "completed"
    except RuntimeError as e:
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_demo_assets(tmp_path_factory.mktemp("demo_assets"))


def test_a_rollout_longer_than_the_collective_timeout_completes_the_step(assets, tmp_path):
    r0, r1 = run_distributed(_slow_rollout_step, 2, str(assets), str(tmp_path / "run"), timeout_s=900)
    assert r0["rollout_s"] >= ROLLOUT_S > 4 * TIMEOUT_S
    assert r1["rollout_s"] is None  # only rank 0 generates
    m = r0["metrics"]
    assert m["actor/updates"] >= 1 and m["actor/num_tokens"] > 0 and m["time/generate_s"] >= ROLLOUT_S
    assert r1["metrics"] == {}
    print(f"[measured] rollout {r0['rollout_s']:.1f} s under a {TIMEOUT_S} s collective timeout: step done")


def test_the_collective_timeout_is_live():
    """The control: the same 2 s timeout fails a plain collective that waits 4 s for rank 0, so the
    step above completes because nobody waited in a collective, not because the timeout was off."""
    _, r1 = run_distributed(_collective_wait_times_out, 2, timeout_s=300)
    assert r1.startswith("failed"), r1


def _rank0_raises(rank: int, world: int) -> str:
    from dapo_megatron.parallel.init import init_distributed, rendezvous_store, shutdown
    from dapo_megatron.parallel.rank0_wait import Rank0Failed, rank0_then_all

    init_distributed(timeout_s=1)

    def work():
        time.sleep(3)  # longer than the 1 s collective timeout
        raise ValueError("no prompts left")

    try:
        rank0_then_all(rendezvous_store(), "dapo/generate/1", rank == 0, work, what="rollout")
        return "no error"
    except (Rank0Failed, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if rank == 0:
            time.sleep(1)  # rank 0 hosts the store: let rank 1 read the key before it goes
        shutdown()


def test_a_rank0_error_reaches_the_waiting_ranks():
    r0, r1 = run_distributed(_rank0_raises, 2, timeout_s=300)
    assert r0 == "ValueError: no prompts left"  # rank 0 re-raises its own exception
    assert r1 == "Rank0Failed: rollout failed on trainer rank 0: ValueError: no prompts left"


def _rank0_dies(rank: int, world: int) -> str:
    from dapo_megatron.parallel.init import init_distributed, rendezvous_store
    from dapo_megatron.parallel.rank0_wait import wait_for_rank0

    init_distributed(timeout_s=1)
    if rank == 0:
        time.sleep(1)
        os._exit(3)  # like a node failure: no exception, no published key
    wait_for_rank0(rendezvous_store(), "dapo/generate/1", what="rollout", poll_s=0.5)
    return "returned"


def test_a_dead_rank0_is_an_error_not_a_hang():
    with pytest.raises(DistributedFailure, match=r"rank 1 of 2 raised:(.|\n)*Rank0LostError: trainer rank 0 stopped"):
        run_distributed(_rank0_dies, 2, timeout_s=300)

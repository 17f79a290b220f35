"""An update that leaves non-finite weights stops the run with a named error, and no checkpoint is
ever written with non-finite weights.

The config refuses inf and nan (``test_config_finite.py``), but finite settings can still overflow:
``optim.lr=1e30`` with ``optim.weight_decay=1e10`` makes AdamW's decoupled decay factor
``1 - lr * wd`` overflow float32, so one update turns the decayed weights into inf/nan while every
gradient is finite (the gradient guard cannot see it). ``lr=1e300`` makes torch's Adam raise a raw
overflow error after it already wrote inf into the weights.
"""

from __future__ import annotations

import os
import subprocess
from functools import partial

import pytest

from tests.cli_runs import BIN, TINY, cli_env, write_demo_assets
from tests.distributed_harness import run_distributed

OVERFLOWING = {"lr": 1e30, "weight_decay": 1e10, "lr_warmup_steps": 0}


def _outcome(fn) -> str:
    """``fn()``'s exception as ``"Type: message"``, or ``"ok"``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects which error it was
        return f"{type(e).__name__}: {e}"
    return "ok"


def _nan_on_rank(actor, rank: int) -> None:
    """Poison one weight of this rank's shard only (TP=2: the shards differ, so must the verdict not)."""
    import torch

    if rank == 1:
        with torch.no_grad():
            next(actor.model_chunks[0].parameters()).view(-1)[0] = float("nan")


def _save_via_session(actor, run_dir: str) -> None:
    """``TrainingSession.save`` on a session holding only what the save path reads before writing."""
    import torch.distributed as dist

    from dapo_megatron.config import Config
    from dapo_megatron.controller.run_dir import RunPaths
    from dapo_megatron.controller.session import TrainingSession

    session = TrainingSession.__new__(TrainingSession)  # no engines, data or logger: only the save path
    session.cfg, session.actor, session.rank0 = Config(), actor, dist.get_rank() == 0
    session.paths = RunPaths.under(run_dir)
    session.sampler, session.rollout = _NoState(), None
    os.makedirs(session.paths.checkpoints_dir, exist_ok=True)
    session.save(1)


class _NoState:
    def state_dict(self) -> dict:
        return {}


def _cases(rank: int, world: int, tmp: str) -> dict:
    from dapo_megatron.config import OptimConfig
    from dapo_megatron.parallel.topology import Topology
    from tests import actor_cases as C

    C.start()
    topo = Topology(world_size=world, tp=2)
    batch = C.make_batch()
    out = {}
    for name, optim in (("overflow", OptimConfig(**OVERFLOWING)), ("raw_overflow", OptimConfig(lr=1e300))):
        actor = C.make_actor(topo, optim=optim)
        out[name] = _outcome(partial(actor.train_step, batch, temperature=C.TEMPERATURE))
        C.teardown()
    actor = C.make_actor(topo)
    out["healthy_save"] = _outcome(lambda: _save_via_session(actor, os.path.join(tmp, "healthy")))
    _nan_on_rank(actor, rank)
    out["poisoned_save"] = _outcome(lambda: _save_via_session(actor, os.path.join(tmp, "poisoned")))
    C.teardown()
    C.finish()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("nonfinite"))
    return tmp, run_distributed(_cases, 2, tmp, timeout_s=300)


def test_an_update_that_overflows_the_weights_stops_with_a_named_error(results):
    _, by_rank = results
    for out in by_rank:  # every rank stops, not only the one holding the bad shard
        assert out["overflow"].startswith("NonFiniteWeightsError:"), out["overflow"]
        assert "optim.lr" in out["overflow"] and "update 1" in out["overflow"], out["overflow"]


def test_an_optimizer_that_raises_after_writing_inf_is_the_same_named_error(results):
    _, by_rank = results
    for out in by_rank:
        assert out["raw_overflow"].startswith("NonFiniteWeightsError:"), out["raw_overflow"]


def test_the_save_path_refuses_non_finite_weights_on_every_rank(results):
    tmp, by_rank = results
    for out in by_rank:
        assert out["healthy_save"] == "ok"
        assert out["poisoned_save"].startswith("NonFiniteWeightsError:"), out["poisoned_save"]
        assert "checkpoint" in out["poisoned_save"]
    assert os.listdir(os.path.join(tmp, "healthy", "checkpoints")) != []
    assert os.listdir(os.path.join(tmp, "poisoned", "checkpoints")) == []  # not even a temporary folder


def test_a_real_run_with_an_overflowing_update_stops_before_any_checkpoint(tmp_path):
    assets = write_demo_assets(tmp_path / "assets")
    run = tmp_path / "run"
    overrides = [f"optim.{k}={v}" for k, v in OVERFLOWING.items()]
    done = subprocess.run([*BIN, "train", "--config", TINY, f"run.dir={run}", "run.eval_every=0", *overrides],
                          env=cli_env(assets), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "NonFiniteWeightsError" in done.stderr and "optim.lr" in done.stderr, done.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert not ckpts.exists() or os.listdir(ckpts) == [], os.listdir(ckpts)

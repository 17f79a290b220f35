"""Settings the actor cannot run fail with a clear message before any process group or model exists."""

from __future__ import annotations

import pytest

from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig
from dapo_megatron.megatron.actor import MegatronActor, check_actor_support
from dapo_megatron.parallel.topology import Topology


def test_impossible_layout_is_refused_by_topology():
    with pytest.raises(ValueError, match=r"world_size=6 is not divisible by tp\*pp\*cp"):
        Topology(world_size=6, tp=4, pp=1)
    with pytest.raises(ValueError, match="needs pipeline parallelism"):
        Topology(world_size=2, tp=2, pp=1, vpp=2)


def test_fp8_without_transformer_engine_is_refused_before_building(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    # TE is absent on CPU machines anyway; hide it so the test means the same on a GPU box with TE.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformer_engine" else real_find_spec(name, *a)
    )
    cfg = ModelConfig(fp8="e4m3", transformer_impl="auto", params_dtype="bfloat16")
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        check_actor_support(Topology(world_size=1), cfg)
    with pytest.raises(RuntimeError, match="model.fp8='e4m3' needs NVIDIA Transformer Engine"):
        MegatronActor(
            None,  # never reached: the check runs before the spec is used
            Topology(world_size=1),
            model_cfg=cfg,
            optim_cfg=OptimConfig(),
            train_cfg=TrainConfig(),
            algo_cfg=AlgoConfig(),
            max_response_len=16,
            total_steps=1,
            prompts_per_step=32,
            group_size=2,
        )


def test_context_parallel_is_refused():
    with pytest.raises(NotImplementedError, match="context parallelism"):
        check_actor_support(Topology(world_size=2, cp=2), ModelConfig())

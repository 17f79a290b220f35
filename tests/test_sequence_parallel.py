"""``parallel.sequence_parallel`` reaches megatron, and is refused where megatron cannot run it.

megatron-core's local layer spec (the CPU path) builds its norms with ``WrappedTorchNorm``, which
asserts ``not config.sequence_parallel``: torch's RMSNorm weights carry no ``sequence_parallel``
mark, so megatron would not sum their gradients over TP. So on CPU the key is refused with a named
error -- by the config when ``model.transformer_impl`` is ``local``, and at model build when ``auto``
resolves to the local layers. The GPU test (two GPUs, Transformer Engine) checks that an update with
SP equals one without.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace

import pytest
import torch

from dapo_megatron.config import Config, ConfigError, ModelConfig, ParallelConfig
from dapo_megatron.parallel.topology import Topology
from tests import actor_cases as C

_TE_ON_CUDA = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def test_config_refuses_sequence_parallel_without_tp():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: .* needs parallel.tensor > 1"):
        ParallelConfig(sequence_parallel=True, tensor=1)
    assert ParallelConfig(sequence_parallel=True, tensor=2).sequence_parallel


def test_config_refuses_sequence_parallel_with_local_layers():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: megatron-core's local layers .* torch norms"):
        Config(model=ModelConfig(transformer_impl="local"), parallel=ParallelConfig(tensor=2, sequence_parallel=True))


def test_local_spec_really_refuses_sequence_parallel():
    """The reason for the refusal, pinned: megatron-core's torch norm asserts SP is off."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from dapo_megatron.megatron.model import model_spec_from_hf, transformer_config

    spec, topo = model_spec_from_hf(C.TINY_HF), Topology(world_size=2, tp=2)
    config = transformer_config(spec, topo, ModelConfig(transformer_impl="local"))
    config.sequence_parallel = True
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        WrappedTorchNorm(config, 64, normalization="RMSNorm")


@pytest.mark.skipif(_TE_ON_CUDA, reason="'auto' resolves to Transformer Engine here, which supports SP")
def test_actor_passes_sequence_parallel_to_the_model():
    """MegatronActor(sequence_parallel=True) reaches the TransformerConfig check (before any
    process group or weight): 'auto' resolves to the local layers on CPU, so the named error."""
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf

    model, optim, train, algo = C.sub_configs()
    kw = dict(optim_cfg=optim, train_cfg=train, algo_cfg=algo, max_response_len=24, total_steps=1)
    kw.update(prompts_per_step=4, group_size=2, model_cfg=replace(model, transformer_impl="auto"))
    match = r"parallel.sequence_parallel needs Transformer Engine .* resolved to 'local'"
    with pytest.raises(ConfigError, match=match):
        MegatronActor(model_spec_from_hf(C.TINY_HF), Topology(world_size=2, tp=2), sequence_parallel=True, **kw)


def _start_trainer_with_sp(rank: int, world: int, hf_dir: str) -> str:
    """Rank function: ``session.start_trainer`` with SP on at TP2; returns the error it raised."""
    from dapo_megatron.controller.session import start_trainer
    from dapo_megatron.parallel.init import shutdown

    cfg = Config(model=ModelConfig(hf_path=hf_dir, transformer_impl="auto"),
                 parallel=ParallelConfig(tensor=2, sequence_parallel=True))  # fmt: skip
    try:
        start_trainer(cfg)
    except ConfigError as e:
        return str(e)
    finally:
        shutdown()
    return ""


@pytest.mark.multiproc
@pytest.mark.skipif(_TE_ON_CUDA, reason="'auto' resolves to Transformer Engine here, which supports SP")
def test_start_trainer_wires_parallel_sequence_parallel(tmp_path):
    """The run's config key reaches the actor: a real 2-rank start refuses it on every rank."""
    from tests.distributed_harness import run_distributed

    (tmp_path / "config.json").write_text(json.dumps(C.TINY_HF))
    errors = run_distributed(_start_trainer_with_sp, 2, str(tmp_path), timeout_s=300)
    assert all("parallel.sequence_parallel needs Transformer Engine" in e for e in errors), errors


# ----------------------------------------------------------------------------- GPU: 2 devices + TE
def _sp_update(rank: int, world: int, tmp: str) -> dict:
    """TP2 on two GPUs with TE layers: one update with SP off, then the same with SP on."""
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_model_parallel

    C.start()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        topo = Topology(world_size=world, tp=2)
        model, optim, train, algo = C.sub_configs()
        model = replace(model, transformer_impl="transformer_engine")
        kw = dict(model_cfg=model, optim_cfg=optim, train_cfg=train, algo_cfg=algo, max_response_len=24)
        kw.update(total_steps=4, prompts_per_step=4, group_size=2)
        batch = C.make_batch()
        out = {}
        for sp in (False, True):
            init_model_parallel(topo, seed=C.SEED)
            actor = MegatronActor(model_spec_from_hf(C.TINY_HF), topo, sequence_parallel=sp, **kw)
            path = os.path.join(tmp, "init")
            if sp:
                load_checkpoint(actor, path, model_only=True)
            else:
                save_checkpoint(actor, path, step=0, extra_state={})
                batch = C.with_old_logprobs(batch, actor.compute_logprobs(batch, temperature=C.TEMPERATURE))
            assert actor.model_chunks[0].config.sequence_parallel is sp
            metrics = actor.train_step(batch, temperature=C.TEMPERATURE)
            lp = actor.compute_logprobs(batch, temperature=C.TEMPERATURE)
            out[sp] = {"seq_multiple": actor.seq_multiple, "metrics": metrics, "lp": lp}
            C.teardown()
        out["mask"] = batch.loss_mask != 0
        return out
    finally:
        C.finish()


@pytest.mark.gpu
@pytest.mark.skipif(
    not _TE_ON_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices and Transformer Engine"
)
def test_sequence_parallel_update_equals_tp2_without_it(tmp_path):
    from tests.distributed_harness import run_distributed

    res = run_distributed(_sp_update, 2, str(tmp_path), timeout_s=600)[0]
    off, on = res[False], res[True]
    assert off["seq_multiple"] == 1 and on["seq_multiple"] == 2  # SP pads columns to a multiple of TP
    loss_abs = abs(on["metrics"]["loss"] - off["metrics"]["loss"])
    lp_abs = float((on["lp"] - off["lp"])[res["mask"]].abs().max())
    C.report("sequence parallel TP2 on vs off (GPU)", f"loss abs {loss_abs:.2e}, logprob abs after update {lp_abs:.2e}")
    assert on["metrics"]["num_tokens"] == off["metrics"]["num_tokens"]
    assert loss_abs <= 1e-5 and lp_abs <= 1e-4

"""Qwen3-MoE through the checkpoint tools: HF -> megatron dist checkpoint -> HF is bit-exact; the
converted checkpoint holds exactly the keys a built model saves and loads at EP2; a checkpoint the
trainer saved at EP2 exports to the trainer's weights and logits; the export streams, holding at most
one layer's experts. The tools run in subprocesses (megatron's save spawns helpers)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import make_tiny_moe
from moe_convert_cases import EXPORT_MEMORY_PROBE, train_side_case
from weights_cases import REPO, from_bytes, hf_logits, hf_state_dict, run_tool

pytestmark = pytest.mark.multiproc
LOGITS_ATOL = 1e-5  # as tests/test_moe_model.py: megatron vs transformers, fp32
TOKENS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def _convert_and_export(hf: str, ckpt: str, out: str, *extra: str) -> None:
    done = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", ckpt)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_tool("convert_megatron_to_hf.py", "--ckpt", ckpt, "--hf-dir", hf, "--out", out, *extra)
    assert done.returncode == 0, done.stderr[-3000:]


def _check_equal(got: dict, want: dict, where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: names differ: {sorted(set(got) ^ set(want))[:6]}"
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, f"{where}: {name}"
        assert torch.equal(got[name], t), f"{where}: {name} differs"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Qwen3-MoE (4 experts, top-2, 2 layers, normalised top-k), its checkpoint and export."""
    root = tmp_path_factory.mktemp("moe_convert")
    paths = {k: str(root / k) for k in ("hf", "ckpt", "export")}
    state = make_tiny_moe(paths["hf"], seed=3, norm_topk_prob=True)
    _convert_and_export(paths["hf"], paths["ckpt"], paths["export"])
    return paths, state


def test_convert_then_export_is_bit_exact_with_per_expert_names(converted):
    paths, state = converted
    assert any(".mlp.experts.3.down_proj.weight" in n for n in state) and len(state) == 45
    _check_equal(hf_state_dict(paths["export"]), state, "export")
    meta = json.loads((REPO / paths["ckpt"] / "conversion.json").read_text())
    assert meta["model_type"] == "qwen3_moe" and meta["num_experts"] == 4 and meta["padded_vocab_size"] == 256
    config, source = (json.loads((REPO / paths[k] / "config.json").read_text()) for k in ("export", "hf"))
    assert config["model_type"] == "qwen3_moe" and config == {**source, "torch_dtype": "float32", "dtype": "float32"}
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths["export"], dtype=torch.float32, attn_implementation="eager")
    assert isinstance(model, Qwen3MoeForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, hf_logits(paths["hf"], TOKENS))


def test_ep2_trainer_loads_the_conversion_and_its_ep2_checkpoint_exports_exactly(converted, tmp_path):
    """The converted checkpoint (written as EP1) loads strictly at EP2 with the source's logits; after
    a weight change, the checkpoint the EP2 trainer saves exports to exactly its gathered weights,
    with the same keys and global shapes as the converter writes, and transformers on the export
    gives the trainer's logits."""
    from megatron.core import dist_checkpointing

    paths, state = converted
    saved, export = str(tmp_path / "ep2_ckpt"), str(tmp_path / "ep2_export")
    ranks = [from_bytes(b) for b in run_distributed(train_side_case, 2, paths["hf"], paths["ckpt"], saved, TOKENS)]
    want = hf_logits(paths["hf"], TOKENS)
    for r in ranks:  # EP2 without TP/PP: both ranks are a last stage
        assert (r["loaded"] - want).abs().max().item() < LOGITS_ATOL
    gathered = ranks[0]["gathered"]
    assert not torch.equal(gathered["model.layers.1.mlp.experts.3.up_proj.weight"],
                           state["model.layers.1.mlp.experts.3.up_proj.weight"])  # fmt: skip
    shapes, converted_shapes = (
        {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(c).items()}
        for c in (saved, paths["ckpt"])
    )
    assert shapes == converted_shapes
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 64, 64)
    done = run_tool("convert_megatron_to_hf.py", "--ckpt", saved, "--hf-dir", paths["hf"], "--out", export)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_equal(hf_state_dict(export), gathered, "export of the EP2 checkpoint")
    got = hf_logits(export, TOKENS)
    for r in ranks:
        assert (got - r["trained"]).abs().max().item() < LOGITS_ATOL


def test_export_holds_at_most_one_layers_experts(tmp_path):
    """8 experts, 4 layers: the tensors the exporter holds at once (loaded and handed to the writer,
    counted per storage until freed) never exceed one layer's experts plus one expert's fc1 (its
    gate/up split) -- whatever the shard size: with 5 GB shards the whole model would be one shard."""
    hf, ckpt, out = (str(tmp_path / k) for k in ("hf", "ckpt", "export"))
    state = make_tiny_moe(hf, seed=5, num_experts=8, num_hidden_layers=4)
    done = run_tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", ckpt)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = tmp_path / "probe.py"
    probe.write_text(EXPORT_MEMORY_PROBE)
    cmd = [sys.executable, str(probe), ckpt, hf, out, str(5 * 1024**3)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.split("PEAK_HELD")[1].split()[0])
    h, eff, experts = 64, 32, 8
    layer_experts = experts * 3 * eff * h * 4  # fp32 bytes
    model = sum(t.numel() * t.element_size() for t in state.values())
    assert peak <= layer_experts + 2 * eff * h * 4, f"held {peak} B; one layer's experts are {layer_experts} B"
    assert peak < model / 4, (peak, model)
    _check_equal(hf_state_dict(out), state, "streamed export")


def test_mismatched_expert_count_and_missing_expert_are_clear_errors(converted, tmp_path):
    """Export against a config with 8 experts names the router key and both shapes; converting a
    folder that lacks one expert's tensor names it. Neither leaves an output folder."""
    paths, _ = converted
    wrong = tmp_path / "hf8"
    make_tiny_moe(str(wrong), seed=3, norm_topk_prob=True, num_experts=8)
    done = run_tool("convert_megatron_to_hf.py", "--ckpt", paths["ckpt"], "--hf-dir", str(wrong),
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "checkpoint tensor 'decoder.layers.mlp.router.weight' has shape [2, 4, 64], config implies [2, 8, 64]" in (
        done.stderr
    )
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    make_tiny_moe(str(broken), seed=3)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.experts.2.gate_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    done = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(broken), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tensor 'model.layers.1.mlp.experts.2.gate_proj.weight' not found" in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["broken", "hf8"]

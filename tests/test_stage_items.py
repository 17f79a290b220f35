"""Which stage leader sends which tensor in the per-stage weight sync (pure; no processes)."""

import pytest

from dapo_megatron.megatron.model import model_spec_from_hf
from dapo_megatron.weights import mapping
from dapo_megatron.weights.stage_gather import stage_items

HF = {"model_type": "qwen2", "num_hidden_layers": 8, "hidden_size": 64, "intermediate_size": 128,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
      "rms_norm_eps": 1e-6, "rope_theta": 1e6}  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_stages_partition_the_model(pp, vpp, tied):
    spec = model_spec_from_hf({**HF, "tie_word_embeddings": tied})
    per_stage = [stage_items(spec, pp, vpp, s) for s in range(pp)]
    names = [i.megatron_name for items in per_stage for i in items]
    assert sorted(names) == sorted(i.megatron_name for i in mapping.conversion_plan(spec))  # each exactly once
    assert per_stage[0][0].megatron_name == "embedding.word_embeddings.weight"
    last = [i.megatron_name for i in per_stage[-1]]
    assert "decoder.final_layernorm.weight" in last and ("output_layer.weight" in last) == (not tied)
    per = 8 // (pp * vpp)
    for s, items in enumerate(per_stage):  # megatron's interleaved split: chunk c of stage s
        layers = sorted({i.layer for i in items if i.layer is not None})
        assert layers == sorted(x for c in range(vpp) for x in range((c * pp + s) * per, (c * pp + s + 1) * per))

"""Routing replay (R3): the engine-side capture (``rollout/routing_capture.py``) and the trainer-side
replay (``megatron/moe_replay.py``) on a real megatron-core Qwen3-MoE against transformers."""

import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import hf_forced_logits, hf_rollout, make_near_tie_moe, replay_case
from weights_cases import from_bytes

from dapo_megatron.rollout.routing_capture import as_meta, routed_experts

TOKENS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def test_routed_experts_takes_each_layers_topk_in_probability_order():
    # 2 rows x 2 positions, flattened batch-major as HF does; 2 layers, 3 experts, top-2.
    layer0 = torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0], [0.0, -1.0, 1.0], [5.0, 6.0, 7.0]])
    layer1 = -layer0
    ids = routed_experts([layer0, layer1], topk=2, batch=2)
    assert ids.shape == (2, 2, 2, 2)
    assert ids[0, 0].tolist() == [[1, 2], [0, 2]]
    assert ids[0, 1].tolist() == [[0, 2], [1, 2]]
    assert ids[1, 0].tolist() == [[2, 0], [1, 0]]
    assert ids[1, 1].tolist() == [[2, 1], [0, 1]]
    assert as_meta(ids[1]) == [[[2, 0], [1, 0]], [[2, 1], [0, 1]]]
    with pytest.raises(ValueError, match="output_router_logits"):
        routed_experts([], topk=2)
    with pytest.raises(ValueError, match="batch=3"):
        routed_experts([layer0], topk=2, batch=3)


def _logprobs(logits, tokens):
    return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]


@pytest.mark.multiproc
def test_replaying_the_rollouts_experts_gives_the_rollouts_logprobs_on_a_near_tie_router(tmp_path):
    folder = str(tmp_path / "near_tie")
    make_near_tie_moe(folder, gap=1e-3)
    rollout_ids = hf_rollout(folder, TOKENS, torch.bfloat16)  # the engine's choice, in its dtype
    own_ids = hf_rollout(folder, TOKENS, torch.float32)
    flipped = (rollout_ids.sort(-1).values != own_ids.sort(-1).values).any(-1).sum().item()
    assert flipped >= 5, f"the model should put tokens near routing ties, but only {flipped} flipped"
    want = _logprobs(hf_forced_logits(folder, TOKENS, rollout_ids), TOKENS)
    got = from_bytes(run_distributed(replay_case, 1, folder, TOKENS, rollout_ids)[0])
    gaps = {k: (_logprobs(got[k], TOKENS) - want).abs().max().item() for k in ("free", "replayed", "after")}
    print(f"max |logprob - rollout logprob|: {gaps}")
    assert gaps["replayed"] < 1e-5, gaps  # the dense models' parity level
    assert gaps["free"] > 1e-3, gaps  # the trainer's own routing departs from the rollout's
    assert gaps["after"] == gaps["free"], gaps  # the targets are cleared when the block ends

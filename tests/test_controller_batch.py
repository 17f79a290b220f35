"""build_train_batch: layout, alignment, advantages and overlong filtering on a hand-checked case."""

import torch

from dapo_megatron.controller.batch import build_train_batch, reward_metrics
from dapo_megatron.types import Group, Sample


def _sample(prompt, response, reward, finish="stop", acc=False):
    return Sample(prompt, response, [-0.5] * len(response), finish, reward=reward, score=reward, acc=acc)


def _groups():
    # Given out of order on purpose: the batch must be ordered by prompt_index.
    g1 = Group(
        prompt_index=7, ground_truth="2", samples=[_sample([5], [6, 7, 8], 1.0, "length"), _sample([5], [9], -1.0)]
    )
    g0 = Group(
        prompt_index=3, ground_truth="1", samples=[_sample([1, 2], [3], 1.0, acc=True), _sample([1, 2], [4, 4], 1.0)]
    )
    return [g1, g0]


def test_layout_and_alignment():
    b = build_train_batch(_groups(), pad_id=0, norm_adv_by_std=True, adv_eps=1e-6, overlong_filter=False)
    assert b.tokens.tolist() == [[1, 2, 3, 0], [1, 2, 4, 4], [5, 6, 7, 8], [5, 9, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert b.seq_group.tolist() == [0, 0, 1, 1]
    assert b.rollout_logprobs[1].tolist() == [0.0, 0.0, -0.5, -0.5]
    # Group 3: rewards (1, 1) are constant -> 0. Group 7: (1, -1): mean 0, unbiased std sqrt(2),
    # so A = +-1/(sqrt(2)+1e-6).
    a = 1.0 / (2**0.5 + 1e-6)
    assert torch.allclose(b.advantages[2], torch.tensor([0.0, a, a, a]))
    assert torch.allclose(b.advantages[3], torch.tensor([0.0, -a, 0.0, 0.0]))
    assert b.advantages[:2].abs().sum() == 0


def test_overlong_filter_masks_truncated_rows():
    b = build_train_batch(_groups(), pad_id=0, norm_adv_by_std=False, adv_eps=1e-6, overlong_filter=True)
    assert b.loss_mask[2].sum() == 0 and b.loss_mask[3].sum() == 1
    assert b.num_response_tokens == 1 + 2 + 1


def test_reward_metrics():
    m = reward_metrics(_groups())
    assert m["reward/mean"] == 0.5 and m["reward/acc"] == 0.25
    assert m["response/len_max"] == 3.0 and m["response/truncation_rate"] == 0.25
    assert m["response/len_mean"] == (3 + 1 + 1 + 2) / 4

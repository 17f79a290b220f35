"""Evaluation in one engine pass: the whole held-out set goes to the embedded engine at once, decodes
as one batch (about one request's worth of forward passes), scores exactly what one-at-a-time does,
and reports its wall time as ``time/eval_s``."""

import json
import pathlib
from types import SimpleNamespace

from dapo_megatron.controller.evaluate import evaluate
from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine

CONFIG = {**json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text()),
          "eos_token_id": None}  # fmt: skip
ROWS, NEW = 24, 6


def run_eval(concurrency):
    engine = EmbeddedEngine(CONFIG, seed=0, max_batch_rows=48, max_seq_len=16)
    prompts = [[4 + i % 7, 5 + i % 5, 6] for i in range(ROWS)]
    data = [SimpleNamespace(ground_truth=str(i % 3), problem_key=f"p{i}") for i in range(ROWS)]
    # "correct" when the first sampled token is even: a deterministic function of the completion
    reward = lambda text, truth: RewardResult(0.0, int(text.split()[0]) % 2 == 0, "")  # noqa: E731
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    params = SamplingParams(n=2, top_p=0.7, max_new_tokens=NEW)
    out = evaluate([engine], data, prompts, reward_fn=reward, decode=decode, params=params, seed=5,
                   concurrency=concurrency)  # fmt: skip
    return out, engine.forward_steps


def test_the_whole_set_decodes_as_one_batch_and_scores_like_one_at_a_time():
    batched, steps = run_eval(None)
    serial, serial_steps = run_eval(1)
    one_request = NEW - 1  # decode steps after the prefill
    assert steps <= one_request + 3, steps  # a few requests may join a step late
    assert serial_steps == ROWS * one_request
    assert batched["eval/num_samples"] == 2 * ROWS and batched["eval/response_len_mean"] == NEW
    strip = lambda m: {k: v for k, v in m.items() if k != "time/eval_s"}  # noqa: E731
    assert strip(batched) == strip(serial)  # bitwise the same completions, so the same numbers
    assert 0 < batched["eval/acc"] < 1
    assert 0 < batched["time/eval_s"] < serial["time/eval_s"]

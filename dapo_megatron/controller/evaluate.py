"""avg@k evaluation through a rollout engine (DAPO's AIME protocol: k samples per problem).

Each evaluation row is sampled ``n_samples`` times with a seed fixed by the row (``seed + row``), so
evaluating the same weights twice gives the same number, and the trainer's eval and the ``eval``
command on the exported model agree up to the engines' numerics.

By default every row is submitted at once (``concurrency=None``): the embedded engine then decodes the
whole held-out set as one continuous batch instead of a few requests at a time. The result carries the
wall time of the pass as ``time/eval_s``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from dapo_megatron.data.dataset import PromptDataset, eval_avg_at_k
from dapo_megatron.rollout.base import SamplingParams


def eval_sampling(eval_cfg: Any) -> SamplingParams:
    """Sampling of evaluation responses from ``cfg.eval`` (k = ``n_samples`` per row)."""
    e = eval_cfg
    return SamplingParams(n=e.n_samples, temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_response_len)


async def _sample_rows(
    engines: Sequence[Any],
    prompt_ids: List[List[int]],
    params: SamplingParams,
    *,
    seed: int,
    concurrency: Optional[int],
    timeout_s: float,
) -> List[list]:
    """Completions of every row, rows spread round-robin over ``engines``; at most ``concurrency``
    requests in flight per engine (None or 0: all of them at once)."""
    limit = len(prompt_ids) if not concurrency else concurrency * len(engines)
    gate = asyncio.Semaphore(max(1, limit))

    async def one(i: int) -> list:
        async with gate:
            engine = engines[i % len(engines)]
            return await engine.generate(prompt_ids[i], params.with_seed(seed + i), timeout_s=timeout_s)

    return list(await asyncio.gather(*(one(i) for i in range(len(prompt_ids)))))


def evaluate(
    engines: Sequence[Any],
    dataset: PromptDataset,
    prompt_ids: List[List[int]],
    *,
    reward_fn: Callable,
    decode: Callable[[List[int]], str],
    params: SamplingParams,
    seed: int = 0,
    concurrency: Optional[int] = None,
    timeout_s: float = 3600.0,
    run: Callable = asyncio.run,
) -> Dict[str, float]:
    """``eval/acc`` (avg@k over every sample), ``eval/pass_at_k``, ``eval/response_len_mean``,
    ``eval/num_samples`` and ``time/eval_s`` (generation and scoring). ``concurrency``: requests in
    flight per engine, None or 0 for the whole set at once. ``run`` executes a coroutine (pass a
    persistent loop's ``run_until_complete`` when the engines are bound to one)."""
    if len(dataset) == 0:
        raise ValueError("evaluate: the evaluation set is empty")
    start = time.perf_counter()
    rows = run(_sample_rows(engines, prompt_ids, params, seed=seed, concurrency=concurrency, timeout_s=timeout_s))
    acc: List[bool] = []
    keys: List[str] = []
    lengths: List[int] = []
    for i, completions in enumerate(rows):
        for c in completions:
            acc.append(bool(reward_fn(decode(c.token_ids), dataset[i].ground_truth).acc))
            keys.append(dataset[i].problem_key)
            lengths.append(len(c.token_ids))
    summary = eval_avg_at_k(acc, keys)
    return {
        "eval/acc": summary["avg_at_k"],
        "eval/pass_at_k": summary["pass_at_k"],
        "eval/response_len_mean": sum(lengths) / len(lengths),
        "eval/num_samples": float(len(acc)),
        "time/eval_s": time.perf_counter() - start,
    }

#!/usr/bin/env python
"""Cost of the process boundary: the embedded engine in process vs in its worker process
(``rollout.embedded_process``), same model, same seeds, same requests.

    OMP_NUM_THREADS=1 python benchmarks/embedded_worker_rtt.py

The model is the demo's shape (2-layer Qwen2, hidden 128, 64-token vocabulary, random fp32 weights, no
EOS so every sample has ``--max-new`` tokens). For each concurrency level C, ``--requests`` requests of
``--n`` samples are sent with C in flight at once. Reported: seconds per request of wall time for both
engines, and the worker's extra time per request. Also the time of one ``update_weights`` of the whole
model (shared memory vs an in-process copy). Run ``uptime`` alongside: on a loaded machine every
wake-up of the client's reader thread and of the worker waits for a core, which the numbers show.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.embedded_client import EmbeddedWorkerEngine

MODEL = dict(model_type="qwen2", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
             eos_token_id=None)  # fmt: skip


async def per_request(engine, requests: int, concurrency: int, n: int, max_new: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await engine.generate(
                [5 + i % 7, 6, 7, 8], SamplingParams(n=n, max_new_tokens=max_new, seed=i), timeout_s=600
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return (time.perf_counter() - t0) / requests


async def update_s(engine, weights, repeats: int = 5) -> float:
    t0 = time.perf_counter()
    for v in range(repeats):
        await engine.update_weights(weights, v + 1)
    return (time.perf_counter() - t0) / repeats


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=16)
    args = ap.parse_args()
    local = EmbeddedEngine(MODEL, seed=0)
    worker = EmbeddedWorkerEngine.start(MODEL, seed=0)
    try:
        await per_request(worker, 4, 1, args.n, args.max_new)  # warm-up of both
        await per_request(local, 4, 1, args.n, args.max_new)
        for c in args.levels:
            a = await per_request(local, args.requests, c, args.n, args.max_new)
            b = await per_request(worker, args.requests, c, args.n, args.max_new)
            print(f"concurrency {c}: in process {a * 1e3:.1f} ms/request, worker {b * 1e3:.1f} ms/request, "
                  f"+{(b - a) * 1e3:.1f} ms", flush=True)  # fmt: skip
        weights = sorted(local.state_dict().items())
        mb = sum(t.numel() * t.element_size() for _, t in weights) / 2**20
        a, b = await update_s(local, weights), await update_s(worker, weights)
        print(f"update_weights ({mb:.2f} MiB): in process {a * 1e3:.1f} ms, worker {b * 1e3:.1f} ms")
    finally:
        await worker.shutdown()


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python
"""Where a decode step of the embedded engine spends its time, and what a step costs by row count.

    OMP_NUM_THREADS=1 python benchmarks/decode_profile.py [--rows 48 128 384 768] [--profile-rows 384]

The model is the demo's (random fp32 weights, as in ``rollout_throughput.py``). For each row count
``R`` a cache of ``R`` slots runs decode steps of all ``R`` rows (random tokens at random positions)
followed by the engine's sampler (top-p 0.7); the mean time per step is printed. Then
``torch.profiler`` records 10 steps at ``--profile-rows`` and prints the top operators by self CPU
time: on a 2-core CPU the step is GEMM-bound (the row count sets its cost), not Python-bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout_throughput import make_model  # noqa: E402


def step_fn(engine, rows: int, width: int):
    """A closure running one decode step of ``rows`` rows plus sampling on its own cache."""
    from dapo_megatron.rollout.embedded_cache import SlotCache, decode_logits
    from dapo_megatron.rollout.embedded_sampling import sample_rows

    c = engine.config
    cache = SlotCache.for_config(c, rows, width, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    ids, pos = torch.randint(c.vocab_size, (rows,), generator=g), torch.randint(width, (rows,), generator=g)
    top_p, top_k, u = torch.full((rows,), 0.7), torch.full((rows,), -1), torch.rand(rows, dtype=torch.float64)

    def step() -> None:
        with torch.no_grad():
            logp = torch.log_softmax(decode_logits(engine.model, cache, ids, pos).float(), dim=-1)
            sample_rows(logp, top_p, top_k, u).tolist()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[48, 128, 384, 768])
    p.add_argument("--profile-rows", type=int, default=384)
    p.add_argument("--width", type=int, default=32, help="cache positions (the demo: 16 prompt + 16 response)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    from dapo_megatron.rollout.embedded import EmbeddedEngine

    with tempfile.TemporaryDirectory() as tmp:
        engine = EmbeddedEngine.from_pretrained(make_model(Path(tmp)), max_batch_rows=8, max_seq_len=args.width)
    print(f"decode step of the demo model, width {args.width}, torch threads {torch.get_num_threads()}")
    print("| rows | ms per step | us per row |\n|---|---|---|")
    for rows in args.rows:
        step = step_fn(engine, rows, args.width)
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        print(f"| {rows} | {ms:.1f} | {ms * 1e3 / rows:.0f} |")
    step = step_fn(engine, args.profile_rows, args.width)
    step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

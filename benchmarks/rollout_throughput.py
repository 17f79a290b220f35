#!/usr/bin/env python
"""Rollout throughput of the embedded engine (continuous batching) and of a real SGLang server on the
same model, in one run.

    python benchmarks/rollout_throughput.py                    # embedded only: batching vs one group at a time
    python benchmarks/rollout_throughput.py --sglang-python .venv-sglang/bin/python   # and SGLang-CPU

The model is the demo's (``dapo-megatron demo --assets-only``: a 2-layer Qwen2, hidden 128, character
vocabulary) with one set of random fp32 weights that both engines load. For each concurrency level C,
C requests of ``--n`` samples each are in flight at once (``--requests`` requests in all), every sample
``--prompt-len`` prompt tokens and up to ``--max-new`` new tokens at temperature 1. Reported: generated
completions and generated tokens per second of wall time (EOS can end a sample early; both engines
sample the same model, so the lengths follow the same distribution) and the mean tokens per sample.
Concurrency 1 is one group at a time (the embedded engine before continuous batching decoded groups
one by one under a lock); higher levels show what batching every request in flight gains.

SGLang runs on its CPU backend (``--device cpu``, torch-native attention), started by the project's
launcher (``LocalSGLangFleet``) and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_model(root: Path) -> str:
    """Demo assets, plus random fp32 weights saved in the model folder (seed 0); returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assets = root / "assets"
    env = dict(os.environ, DEMO_ASSETS=str(assets), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "dapo_megatron", "demo", "--assets-only", str(assets), "--config",
                    str(REPO / "examples" / "demo_cpu.yaml")], check=True, env=env, capture_output=True)  # fmt: skip
    model = assets / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model)
    return str(model)


async def measure(engine, *, concurrency: int, requests: int, n: int, prompt_len: int, max_new: int) -> tuple:
    """(completions/s, tokens/s, mean tokens per sample) for ``requests`` requests, ``concurrency`` at a
    time."""
    from dapo_megatron.rollout.base import SamplingParams

    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new)
    sem = asyncio.Semaphore(concurrency)
    lengths = []

    async def one(i: int) -> None:
        async with sem:
            prompt = [3 + (i + k) % 20 for k in range(prompt_len)]
            for c in await engine.generate(prompt, params.with_seed(i), timeout_s=600):
                lengths.append(len(c.token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - start
    return len(lengths) / elapsed, sum(lengths) / elapsed, sum(lengths) / len(lengths)


def print_fill(engine) -> None:
    """The embedded engine's decode fill over the whole run: running rows per row computed."""
    print(f"embedded decode fill (running rows / rows computed, all levels): {engine.decode_fill:.2f}")


def run_all(engine, levels, args) -> dict:
    """Every concurrency level on one event loop (the SGLang adapter's HTTP client belongs to it)."""

    async def levels_then_close() -> dict:
        out = {}
        try:
            for c in levels:
                out[c] = await measure(engine, concurrency=c, requests=max(args.requests, c), n=args.n,
                                       prompt_len=args.prompt_len, max_new=args.max_new)  # fmt: skip
        finally:
            await engine.shutdown()
        return out

    return asyncio.run(levels_then_close())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sglang-python", default="", help="also measure a SGLang CPU server run by this Python")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 48])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--n", type=int, default=8, help="samples per request (a DAPO group)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--max-new", type=int, default=48, help="the demo model's context is 64 positions")
    p.add_argument("--slots", type=int, default=None, help="the embedded engine's max_batch_rows (default: its own)")
    args = p.parse_args()

    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.rollout.sglang import SGLangEngine
    from dapo_megatron.rollout.sglang_server import LocalSGLangFleet, ServerOptions

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        emb = EmbeddedEngine.from_pretrained(model, max_batch_rows=args.slots)
        embedded = run_all(emb, args.levels, args)
        print_fill(emb)
        sglang = None
        if args.sglang_python:
            opts = ServerOptions(model, device="cpu", api_key="bench", max_total_tokens=16384)
            fleet = LocalSGLangFleet(opts, 1, python=args.sglang_python, log_dir=tmp).start(timeout_s=900)
            try:
                engine = SGLangEngine(fleet.base_url, worker_urls=fleet.worker_urls, api_key="bench")
                sglang = run_all(engine, args.levels, args)
            finally:
                fleet.stop()
    print(f"rollout throughput, demo model, {args.requests} requests of {args.n} samples, prompt {args.prompt_len}, "
          f"max {args.max_new} new tokens, torch threads {torch.get_num_threads()}")  # fmt: skip
    head = "| concurrent requests | embedded completions/s | embedded tok/s | vs one group at a time |"
    print(head + (" SGLang-CPU completions/s | SGLang-CPU tok/s | mean tokens/sample (emb / sgl) |" if sglang else ""))
    print("|---" * (4 + 3 * bool(sglang)) + "|")
    base = embedded[args.levels[0]][0]
    for c in args.levels:
        ec, et, el = embedded[c]
        row = f"| {c} | {ec:.1f} | {et:.0f} | {ec / base:.1f}x |"
        if sglang:
            sc, st, sl = sglang[c]
            row += f" {sc:.1f} | {st:.0f} | {el:.1f} / {sl:.1f} |"
        print(row)


if __name__ == "__main__":
    main()

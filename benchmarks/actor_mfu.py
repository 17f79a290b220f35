#!/usr/bin/env python
"""Model FLOP utilisation of the Megatron actor's training step, against a matmul peak measured here.

    python benchmarks/actor_mfu.py                       # Qwen2.5-1.5B shape, seq 4096, bf16 (GPU)
    torchrun --nproc-per-node 2 benchmarks/actor_mfu.py --tp 2
    python benchmarks/actor_mfu.py --tiny                # tiny float32 model on CPU: a smoke test

The model has Qwen2.5-1.5B's shape (28 layers, hidden 1536, ffn 8960, 12 heads / 2 KV groups,
vocab 151936, tied embeddings, q/k/v bias), random weights. Each step is one
``MegatronActor.sft_step`` over ``--micro-batches`` micro-batches of ``--micro-batch-size`` rows of
``--seq-len`` tokens (every position a target): the same schedule, loss scaling and optimizer step
as a DAPO update, without the log-prob recomputation.

FLOPs per step (stated, so numbers compare across runs):

    model FLOPs = 6 * N * tokens  +  6 * L * s * h * tokens
      N = matmul parameters: per layer q, k, v, o, gate, up, down, plus the output projection
          (V x h; counted although tied, since the matmul runs); embeddings lookups excluded
      6 * L * s * h = attention scores + weighted sum (2 matmuls x 2 FLOPs x s x h per token,
          forward + 2x backward = 3x), halved for the causal mask

MFU = model TFLOP/s / measured peak TFLOP/s of a dense 8192^3 matmul in the same dtype and process
(not the datasheet number). Prints tokens/s as well. Activation recompute would add FLOPs that are
not counted (it is off by default).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

QWEN25_15B = {
    "model_type": "qwen2",
    "num_hidden_layers": 28,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {
    **QWEN25_15B,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 256,
}


def matmul_params(spec) -> int:
    """N: parameters that take part in a matmul per token (see the module docstring)."""
    h, d = spec.hidden_size, spec.kv_channels
    per_layer = h * d * (spec.num_attention_heads + 2 * spec.num_query_groups)  # q, k, v
    per_layer += spec.num_attention_heads * d * h  # o
    per_layer += 3 * h * spec.ffn_hidden_size  # gate, up, down
    return spec.num_layers * per_layer + spec.vocab_size * h


def step_flops(spec, tokens: int, seq_len: int) -> float:
    attention = 6 * spec.num_layers * seq_len * spec.hidden_size
    return float(tokens) * (6 * matmul_params(spec) + attention)


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> float:
    """Measured TFLOP/s of an ``n x n x n`` matmul (best of ``repeats``, after one warm-up)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny float32 model (CPU smoke test)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--recompute", choices=["none", "full", "selective"], default="none")
    return p.parse_args()


def _setup(args):
    """Process group (single process when not under torchrun), parallel state, and the actor."""
    from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):  # fmt: skip
        os.environ.setdefault(key, value)
    env = init_distributed()
    topo = Topology(world_size=env.world_size, tp=args.tp, pp=args.pp)
    init_model_parallel(topo, seed=1234)
    spec = model_spec_from_hf(TINY if args.tiny else QWEN25_15B)
    model_cfg = ModelConfig(
        params_dtype="float32" if args.tiny else "bfloat16",
        transformer_impl="local" if args.tiny else "auto",
        recompute_granularity=None if args.recompute == "none" else args.recompute,
    )
    actor = MegatronActor(
        spec, topo, model_cfg=model_cfg, optim_cfg=OptimConfig(lr=1e-6, lr_warmup_steps=0),
        train_cfg=TrainConfig(micro_batch_size=args.micro_batch_size, ppo_mini_batch_size=1),
        algo_cfg=AlgoConfig(), max_response_len=args.seq_len, total_steps=100, prompts_per_step=1, group_size=1,
    )  # fmt: skip
    return env, topo, spec, actor


def main() -> None:
    args = _args()
    if args.tiny:
        args.seq_len, args.steps = min(args.seq_len, 32), min(args.steps, 2)
    env, topo, spec, actor = _setup(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    peak = matmul_peak_tflops(dtype, device, 512 if args.tiny else 8192, repeats=3 if args.tiny else 10)
    rows = args.micro_batch_size * args.micro_batches * topo.dp
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (rows, args.seq_len), generator=g)
    mask = torch.ones(rows, args.seq_len)
    mask[:, 0] = 0
    for _ in range(2):
        actor.sft_step(tokens, mask)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = actor.sft_step(tokens, mask)
    _sync(device)
    per_step = (time.perf_counter() - start) / args.steps
    flops = step_flops(spec, rows * args.seq_len, args.seq_len)
    tflops_per_gpu = flops / per_step / 1e12 / env.world_size
    if env.rank == 0:
        print(
            f"layout {topo.describe()}  dtype {dtype}  seq {args.seq_len}  rows/step {rows}  N {matmul_params(spec):,}"
        )
        print("FLOPs/step = 6*N*tokens + 6*L*s*h*tokens (causal attention; see docstring)")
        print(f"step {per_step:.3f} s  loss {metrics['loss']:.4f}  tokens/s {rows * args.seq_len / per_step:,.0f}")
        print(f"model TFLOP/s per device {tflops_per_gpu:.2f}  measured matmul peak {peak:.2f}  "
              f"MFU {tflops_per_gpu / peak:.1%}")  # fmt: skip
    from dapo_megatron.parallel.init import shutdown

    shutdown()


if __name__ == "__main__":
    main()

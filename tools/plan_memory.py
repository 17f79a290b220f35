#!/usr/bin/env python
"""Per-GPU memory plan and FLOPs estimate of a training layout, on paper (no GPU, no torch).

    python tools/plan_memory.py --preset qwen2.5-32b --tp 8 --pp 2 --dp 8 --distributed-optimizer \\
        --prompt-len 2048 --response-len 20480 --micro-batch 1 --recompute full \\
        --colocated --engine-tp 8 --mem-fraction 0.7 --gpu-mem-gib 80
    python tools/plan_memory.py --hf-config Qwen2.5-7B/config.json --tp 4 --seq-len 8192
    python tools/plan_memory.py --preset qwen3-30b-a3b --tp 2 --sequence-parallel --dp 8 --ep 8 --etp 1 \\
        --distributed-optimizer --seq-len 24576 --recompute full --separate-engine --engine-tp 4 --mem-fraction 0.85

Prints a table of GiB per GPU per item (first and last pipeline stage), the training and rollout
phase totals against the GPU memory, a verdict with the headroom, for MoE the expert parameters per
GPU and the all-to-all volume, and the FLOPs per token (MoE: of the active parameters) turned
into tokens per second and, with ``--tokens-per-step``, seconds per step at an assumed MFU.
The model and its assumptions are in :mod:`dapo_megatron.observability.memory_plan`.

Exit status: 0 fits, 1 does not fit, 2 invalid arguments or layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_megatron.observability import memory_plan as mp  # noqa: E402
from dapo_megatron.observability import memory_report as report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (memory flags in GiB, lengths in tokens)."""
    p = argparse.ArgumentParser(
        prog="plan_memory.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"built-in shape: {', '.join(mp.PRESETS)}")
    src.add_argument("--hf-config", help="HF config.json (or the folder holding it)")
    for name in ("tp", "pp", "dp", "cp", "vpp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} degree (default 1)")
    p.add_argument("--etp", type=int, default=0, help="expert-tensor-parallel degree (default: the TP degree)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer state over DP x CP")
    p.add_argument("--seq-len", type=int, help="tokens per trained sequence (or give --prompt-len and --response-len)")
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens, added to --response-len")
    p.add_argument("--response-len", type=int, default=0, help="response tokens, added to --prompt-len")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--recompute", choices=mp.RECOMPUTE, default="none")
    p.add_argument("--params-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--no-flash-attention", action="store_true", help="keep the s x s softmax output")
    p.add_argument(
        "--logprob-chunk", type=int, default=1024, help="tokens per log-prob chunk (train.logprob_chunk_size)"
    )
    eng = p.add_mutually_exclusive_group()
    eng.add_argument("--colocated", action="store_true", help="the rollout engine shares the trainer's GPUs")
    eng.add_argument("--separate-engine", action="store_true", help="plan the rollout engine's own GPUs too")
    p.add_argument("--engine-tp", type=int, default=1, help="TP degree inside one engine")
    p.add_argument("--no-offload", action="store_true",
                   help="colocated: the trainer's state stays on the GPU while the engine runs "
                   "(rollout.offload_trainer=false)")  # fmt: skip
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=int, help="KV pool size of one engine, in tokens")
    kv.add_argument("--mem-fraction", type=float, help="SGLang mem_fraction_static (default 0.7)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="flat overhead per process, GiB (default 2)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H800: 989)")
    p.add_argument("--tokens-per-step", type=float, help="trained tokens per step, for the time per step")
    return p


def load_shape(args: argparse.Namespace) -> mp.ModelShape:
    """The preset, or the shape read from ``--hf-config`` (a config.json or its folder)."""
    return mp.preset(args.preset) if args.preset else report.load_hf_shape(args.hf_config)


def seq_len_of(args: argparse.Namespace) -> int:
    """Tokens per trained sequence: ``--seq-len`` or ``--prompt-len + --response-len``."""
    split = args.prompt_len + args.response_len
    if (args.seq_len is None) == (split == 0):
        raise ValueError("give either --seq-len or --prompt-len/--response-len")
    return args.seq_len if args.seq_len is not None else split


def rollout_of(args: argparse.Namespace) -> Optional[mp.Rollout]:
    """The engine from the flags, or None (trainer only); the KV pool defaults to mem fraction 0.7."""
    if not (args.colocated or args.separate_engine):
        if args.engine_tp != 1 or args.kv_cache_tokens is not None or args.mem_fraction is not None:
            raise ValueError("--engine-tp, --kv-cache-tokens and --mem-fraction need --colocated or --separate-engine")
        return None
    fraction = args.mem_fraction
    if args.kv_cache_tokens is None and fraction is None:
        fraction = 0.7
    return mp.Rollout(
        colocated=args.colocated, engine_tp=args.engine_tp, kv_cache_tokens=args.kv_cache_tokens,
        mem_fraction=fraction, offload_trainer=not args.no_offload,
    )  # fmt: skip


def make_plan(args: argparse.Namespace) -> mp.MemoryPlan:
    """The memory plan of the flags (GiB flags converted to bytes)."""
    shape = load_shape(args)
    layout = mp.Layout(
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        cp=args.cp,
        vpp=args.vpp,
        sequence_parallel=args.sequence_parallel,
        distributed_optimizer=args.distributed_optimizer,
        ep=args.ep,
        etp=args.etp,
    )
    work = mp.Workload(
        seq_len=seq_len_of(args),
        micro_batch=args.micro_batch,
        recompute=args.recompute,
        params_dtype=args.params_dtype,
        flash_attention=not args.no_flash_attention,
        logprob_chunk=args.logprob_chunk,
    )
    return mp.plan_memory(
        shape,
        layout,
        work,
        gpu_mem=args.gpu_mem_gib * mp.GIB,
        rollout=rollout_of(args),
        overhead=args.overhead_gib * mp.GIB,
    )


def compute(plan: mp.MemoryPlan, args: argparse.Namespace) -> List[str]:
    """FLOPs per token (G = 1e9), tokens per second per GPU at the assumed MFU, seconds per step."""
    f = mp.flops_per_token(plan.shape, plan.work.seq_len, plan.work.recompute)
    rate = mp.tokens_per_s_per_gpu(f.model, args.peak_tflops * 1e12, args.mfu)
    lines = [
        f"compute FLOPs/token at seq {plan.work.seq_len}: train {f.model / 1e9:.1f} G (6N + attention), "
        f"with recompute {f.hardware / 1e9:.1f} G, forward {f.forward / 1e9:.1f} G",
        f"        at MFU {args.mfu:.2f} of {args.peak_tflops:.0f} TFLOP/s: {rate:,.0f} trained tokens/s/GPU, "
        f"{rate * plan.layout.world_size:,.0f} on {plan.layout.world_size} GPUs",
    ]
    if args.tokens_per_step:
        train = mp.step_time_s(args.tokens_per_step, rate, plan.layout.world_size)
        fwd = mp.step_time_s(args.tokens_per_step, rate * f.model / f.forward, plan.layout.world_size)
        lines.append(
            f"        step of {args.tokens_per_step:,.0f} tokens: train {train:,.0f} s + old-logprob "
            f"forward {fwd:,.0f} s = {train + fwd:,.0f} s (rollout time not included)"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """Print the plan; exit status 0 fits, 1 does not fit (2 from argparse on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))  # exits with status 2
    print("\n".join(report.report(plan, args.tokens_per_step) + [""] + compute(plan, args)))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())

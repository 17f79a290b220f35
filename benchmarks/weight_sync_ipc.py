#!/usr/bin/env python
"""CUDA-IPC weight transfer between two processes on one GPU, against the device's copy bandwidth.

    python benchmarks/weight_sync_ipc.py [--gb 15] [--bucket-mb 512] [--repeats 3]

The sender (this process) holds bf16 tensors with Qwen2.5-7B-like shapes (~15 GB at the default
size; fewer layers when ``--gb`` is smaller) and pushes them bucket by bucket through
:class:`~dapo_megatron.weights.transports.CudaIpcSender`; a second process (the "engine") opens each
bucket with :class:`CudaIpcReceiver`, copies it into its own memory and confirms over a pipe, after
which the sender frees the bucket (the ordering the transport requires). Printed: the device's
measured device-to-device copy bandwidth, the effective IPC transfer rate (GB/s over the whole
update, packing + handle exchange + peer copy), and the ratio. Needs CUDA; exits with a message
otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.multiprocessing as mp

# Per-layer shapes of a 7B model (hidden 3584, 28 heads / 4 KV heads of 128, ffn 18944, vocab 152064).
HIDDEN, FFN, VOCAB, Q, KV = 3584, 18944, 152064, 3584, 512
LAYER = [("q", (Q, HIDDEN)), ("k", (KV, HIDDEN)), ("v", (KV, HIDDEN)), ("o", (HIDDEN, Q)),
         ("gate", (FFN, HIDDEN)), ("up", (FFN, HIDDEN)), ("down", (HIDDEN, FFN)), ("ln1", (HIDDEN,)),
         ("ln2", (HIDDEN,))]  # fmt: skip


def model_shapes(target_bytes: float):
    """(name, shape) list with embedding + lm_head + as many layers as fit ``target_bytes`` (bf16)."""
    per_layer = sum(2 * torch.Size(s).numel() for _, s in LAYER)
    embed = 2 * VOCAB * HIDDEN
    layers = max(1, int((target_bytes - 2 * embed) // per_layer))
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    shapes += [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in LAYER]
    return shapes + [("lm_head.weight", (VOCAB, HIDDEN))]


def copy_bandwidth(nbytes: int = 2 * 1024**3, repeats: int = 5) -> float:
    """Device-to-device copy GB/s (read + write counted once, as a transfer of ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return nbytes * repeats / (time.perf_counter() - start) / 1e9


def engine(conn) -> None:
    """The receiving process: load each payload, keep the copies, confirm."""
    from dapo_megatron.weights.transports import CudaIpcReceiver

    receiver = CudaIpcReceiver()
    kept = {}
    while True:
        payload = conn.recv_bytes()
        if not payload:
            break
        named, version = receiver.load(payload)
        kept.update(named)  # the engine's own weights (overwritten each update)
        conn.send(version)
    conn.send(sum(t.numel() * t.element_size() for t in kept.values()))


def buckets_of(named, max_bytes):
    from dapo_megatron.weights.reshard import bucketize

    return list(bucketize(named, max_bytes))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=15.0, help="model size to transfer (bf16 GB)")
    p.add_argument("--bucket-mb", type=int, default=512, help="bucket size bound")
    p.add_argument("--repeats", type=int, default=3, help="full-model updates to time")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("weight_sync_ipc: needs a CUDA GPU (none visible); nothing measured", file=sys.stderr)
        return 2
    from dapo_megatron.weights.transports import CudaIpcSender

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=engine, args=(child,))
    proc.start()
    named = [(n, torch.randn(s, device="cuda", dtype=torch.bfloat16)) for n, s in model_shapes(args.gb * 1e9)]
    total = sum(t.numel() * t.element_size() for _, t in named)
    buckets = buckets_of(named, args.bucket_mb * 1024**2)

    def deliver(payload: bytes, version: int) -> None:
        parent.send_bytes(payload)
        assert parent.recv() == version  # the engine copied the bucket: only now may it be freed

    sender = CudaIpcSender(deliver)
    bw = copy_bandwidth()
    sender.send_bucket(buckets[0], 0)  # warm-up: CUDA context and IPC mappings in the engine
    times = []
    for version in range(1, args.repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for bucket in buckets:
            sender.send_bucket(bucket, version)
        times.append(time.perf_counter() - start)
    parent.send_bytes(b"")
    received = parent.recv()
    proc.join()
    best = min(times)
    print(f"model: {total / 1e9:.2f} GB bf16 in {len(named)} tensors, {len(buckets)} buckets of <= {args.bucket_mb} MB")
    print(f"device copy bandwidth (D2D): {bw:.1f} GB/s")
    print(f"CUDA-IPC update: best {best:.3f} s of {args.repeats} -> effective {total / best / 1e9:.1f} GB/s "
          f"({total / best / 1e9 / bw:.2f} x copy bandwidth); engine holds {received / 1e9:.2f} GB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

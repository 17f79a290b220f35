#!/usr/bin/env python
"""Weight sync at PP=2 on CPU: gather-to-rank-0 then send, against every stage sending its own layers.

    python benchmarks/weight_sync_stages.py [--layers 12] [--hidden 768] [--bucket-mb 64] [--repeats 3]

Two trainer ranks (gloo, real megatron-core, PP=2, TP=1) hold a random ~100M-parameter Qwen2-shaped
model (fp32; 12 layers of hidden 768 / ffn 2048 / 12 heads, 4 KV groups, untied 16000-token vocab).
The engine is stood in for by a **gloo receiver process** (not an SGLang server: on this CPU a real
server's per-bucket load would dominate and hide the trainer side; the test
``tests/test_weight_sync_stages.py`` covers real servers). It joins one update group per sender,
built exactly as an SGLang server builds its side (:func:`create_update_group`), and copies every
received bucket into its own memory, as an engine's loader would.

* **sequential** (today's path without a link): :func:`iter_hf_weights` gathers every tensor to rank 0
  (stage 1's tensors cross to rank 0 point to point), rank 0 buckets and sends them;
* **per stage** (the new path): each stage leader runs :func:`iter_stage_hf_weights` on its own layers
  and sends its own buckets over its own group, concurrently; the receiver takes both groups in two
  threads (SGLang 0.5.23 serves one bucket at a time per server; with one group per stage it still
  never waits for a stage that is busy gathering).

Printed: bytes moved, the machine's memcpy bandwidth measured in the same run (one large ``copy_`` in
rank 0; bytes copied per second), each path's median wall time and GB/s, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
import torch.multiprocessing as mp

SENTINEL: list = []  # an empty bucket ends a stream


def hf_config(layers: int, hidden: int) -> dict:
    return {"model_type": "qwen2", "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 2048,
            "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 16000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False}  # fmt: skip


def memcpy_gb_per_s(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes copied per second by one large contiguous ``copy_`` (best of ``repeats``)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _group(port: int, rank: int, name: str):
    from dapo_megatron.weights.transports import create_update_group

    return create_update_group(master_address="127.0.0.1", master_port=port, world_size=2, rank=rank,
                               backend="gloo", group_name=name)  # fmt: skip


def _drain(group) -> int:
    """Receiver side of one stream: buckets until the empty one; bytes received (copied once more)."""
    from dapo_megatron.weights.transports import BroadcastReceiver

    rx, total = BroadcastReceiver(group), 0
    while True:
        named, _ = rx.recv_bucket()
        if not named:
            return total
        for _, t in named:
            total += t.clone().numel() * t.element_size()  # the engine's copy into its own weights


def receiver(ports: dict, repeats: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    groups = {k: _group(p, 1, k) for k, p in ports.items()}
    for _ in range(repeats):
        _drain(groups["seq"])
        threads = [threading.Thread(target=_drain, args=(groups[k],)) for k in ("pp0", "pp1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _send_stream(sender, buckets, leader: bool) -> int:
    """Exhaust ``buckets`` (collective); the leader sends each, then the end marker. Bytes sent."""
    sent = 0
    for bucket in buckets:
        if leader:
            sender.send_bucket(bucket, 0)
            sent += sum(t.numel() * t.element_size() for _, t in bucket)
    if leader:
        sender.send_bucket(SENTINEL, 0)
    return sent


def trainer(rank: int, port: int, ports: dict, args, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from dapo_megatron.config import ModelConfig
    from dapo_megatron.megatron.model import build_model_chunks, model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology
    from dapo_megatron.weights.reshard import bucketize, iter_hf_weights
    from dapo_megatron.weights.stage_gather import iter_stage_hf_weights
    from dapo_megatron.weights.transports import BroadcastSender

    init_distributed(backend="gloo")
    topology = Topology(2, tp=1, pp=2, vpp=1)
    init_model_parallel(topology, seed=1)
    spec = model_spec_from_hf(hf_config(args.layers, args.hidden))
    chunks = build_model_chunks(spec, topology, ModelConfig(params_dtype="float32", transformer_impl="local"))
    seq = BroadcastSender(_group(ports["seq"], 0, "seq")) if rank == 0 else None
    mine = BroadcastSender(_group(ports[f"pp{rank}"], 0, f"pp{rank}"))
    bucket_bytes = args.bucket_mb << 20
    times: dict = {"seq": [], "stages": []}
    sent: dict = {}
    for _ in range(args.repeats):
        dist.barrier()
        t = time.perf_counter()
        sent["seq"] = _send_stream(seq, bucketize(iter_hf_weights(chunks, spec, topology), bucket_bytes), rank == 0)
        dist.barrier()
        times["seq"].append(time.perf_counter() - t)
        t = time.perf_counter()
        per_stage = _send_stream(mine, bucketize(iter_stage_hf_weights(chunks, spec, topology), bucket_bytes), True)
        gathered = [None, None]
        dist.all_gather_object(gathered, per_stage)  # the "done" report rank 0 waits for before stamping
        times["stages"].append(time.perf_counter() - t)
        sent["stages"] = gathered
    if rank == 0:
        params = sum(p.numel() for c in chunks for p in c.parameters())
        out.put({"times": times, "sent": sent, "memcpy": memcpy_gb_per_s(), "params_stage0": params})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from dapo_megatron.rollout.process import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ports = {k: free_port() for k in ("seq", "pp0", "pp1")}
    master = free_port()
    procs = [ctx.Process(target=receiver, args=(ports, args.repeats))]
    procs += [ctx.Process(target=trainer, args=(r, master, ports, args, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    res = out.get(timeout=3600)
    for proc in procs:
        proc.join(timeout=120)
    _report(res, args)


def _report(res: dict, args) -> None:
    total = res["sent"]["seq"]
    per = res["sent"]["stages"]
    assert sum(per) == total, (per, total)  # both paths move the same HF bytes
    seq, stages = statistics.median(res["times"]["seq"]), statistics.median(res["times"]["stages"])
    print(
        f"model: {total / 4 / 1e6:.1f} M parameters (fp32, {total / 1e9:.3f} GB), PP=2 TP=1, "
        f"buckets of {args.bucket_mb} MB, {args.repeats} repeats (median shown)"
    )
    print("receiver: a gloo process standing in for the engine (one update group per sender), not an SGLang server")
    print(f"memcpy bandwidth (same run, one {512} MB copy_): {res['memcpy']:.2f} GB/s")
    print(
        f"sequential gather-to-rank-0 + send: {seq:.2f} s, {total / seq / 1e9:.3f} GB/s "
        f"({total / seq / 1e9 / res['memcpy']:.1%} of memcpy)"
    )
    print(
        f"per-stage parallel (stage bytes {per[0] / 1e6:.0f} MB + {per[1] / 1e6:.0f} MB): {stages:.2f} s, "
        f"{total / stages / 1e9:.3f} GB/s ({total / stages / 1e9 / res['memcpy']:.1%} of memcpy)"
    )
    print(f"ratio sequential / per-stage: {seq / stages:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Peak extra memory and time of the chunked log-prob + entropy kernel against a naive fp32 log_softmax.

    python benchmarks/logprob_memory.py                          # GPU: 32768 tokens x vocab 151936, bf16 logits
    python benchmarks/logprob_memory.py --tokens 2048 --reps 2   # CPU: smaller, same comparison

Both variants compute, for bf16 logits ``[tokens, vocab]`` at temperature T, the per-token log-prob of a
target and the entropy of ``softmax(logits / T)``, then backpropagate ``sum(w1 * logp + w2 * entropy)``
to the logits, as the actor's loss does:

* ``chunked``: ``dapo_megatron.megatron.logprobs.token_logprobs_and_entropy`` (fp32 working set of
  ``--chunk`` tokens at a time, softmax recomputed in the backward);
* ``naive``: ``log_softmax(logits.float() / T)`` over the whole tensor, ``gather``, and
  ``-(p * logp).sum(-1)``, with autograd.

"Extra" memory is what a variant allocates beyond its inputs (logits, targets, weights), the logits'
gradient included (the same size for both, and unavoidable). On a GPU it is read from the CUDA caching
allocator's peak; on a CPU from the process's peak resident size, sampled every millisecond in a fresh
process per variant (coarser, and it includes allocator slack). Time is the median over ``--reps``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_inputs(tokens: int, vocab: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=gen) * 3).to(device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    w1, w2 = torch.randn(tokens, generator=gen).to(device), torch.randn(tokens, generator=gen).to(device)
    return logits.requires_grad_(), targets, w1, w2


def chunked(logits, targets, temperature: float, chunk: int):
    from dapo_megatron.megatron.logprobs import token_logprobs_and_entropy

    return token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk)


def naive(logits, targets, temperature: float, chunk: int):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


VARIANTS = {"chunked": chunked, "naive": naive}


def step(fn, inputs, temperature: float, chunk: int):
    """One forward + backward; returns (logp, entropy) detached, for the equality check."""
    logits, targets, w1, w2 = inputs
    logits.grad = None
    logp, entropy = fn(logits, targets, temperature, chunk)
    (w1 * logp + w2 * entropy).sum().backward()
    return logp.detach(), entropy.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class RssPeak:
    """Peak resident set size of this process while the ``with`` block runs (CPU measurement)."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(name: str, args: argparse.Namespace) -> dict:
    """Time (median of ``reps``) and peak extra bytes of one variant, in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    fn = VARIANTS[name]
    step(fn, make_inputs(8, args.vocab, device, seed=1), args.temperature, args.chunk)  # imports, kernel set-up
    inputs = make_inputs(args.tokens, args.vocab, device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step(fn, inputs, args.temperature, args.chunk)
        _sync(device)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        with RssPeak() as rss:
            out = step(fn, inputs, args.temperature, args.chunk)
        extra = rss.peak - rss.base
    times = []
    for _ in range(args.reps):
        _sync(device)
        start = time.perf_counter()
        step(fn, inputs, args.temperature, args.chunk)
        _sync(device)
        times.append(time.perf_counter() - start)
    # Plain lists: tensors would cross the process boundary as shared memory that dies with the child.
    return {"extra_bytes": extra, "seconds": statistics.median(times), "logp": out[0].cpu().tolist(),
            "entropy": out[1].cpu().tolist()}  # fmt: skip


def _child(name: str, args: argparse.Namespace, queue) -> None:
    try:
        queue.put(measure(name, args))
    except torch.cuda.OutOfMemoryError:  # the naive variant needs ~9x the logits; say so instead of dying
        queue.put({"oom": True})


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process, so one variant's freed memory cannot hide the other's growth."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the chunked kernel")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    results = {name: run_isolated(name, args) for name in VARIANTS}
    for name, r in results.items():
        if r.get("oom"):
            print(f"{name}: out of device memory at {args.tokens} tokens; run again with a smaller --tokens")
            return 1
    c, n = results["chunked"], results["naive"]
    gap = max((torch.tensor(c[k]) - torch.tensor(n[k])).abs().max().item() for k in ("logp", "entropy"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    logits_gib = args.tokens * args.vocab * 2 / 2**30
    print(f"device {device}; {args.tokens} tokens x vocab {args.vocab}, bf16 logits {logits_gib:.2f} GiB, "
          f"chunk {args.chunk}, forward + backward, median of {args.reps}")  # fmt: skip
    grad = args.tokens * args.vocab * 2  # the logits' bf16 gradient, allocated by both variants
    for name, r in results.items():
        print(f"{name:8s} extra memory {r['extra_bytes'] / 2**30:7.2f} GiB "
              f"({(r['extra_bytes'] - grad) / 2**30:7.2f} GiB without the logits gradient)   "
              f"time {r['seconds'] * 1e3:9.1f} ms")  # fmt: skip
    ratio = c["extra_bytes"] / max(n["extra_bytes"], 1)
    ratio_no_grad = (c["extra_bytes"] - grad) / max(n["extra_bytes"] - grad, 1)
    print(f"chunked / naive: memory {ratio:.3f}x ({ratio_no_grad:.3f}x without the gradient), "
          f"time {c['seconds'] / n['seconds']:.3f}x; max |difference| of logp/entropy {gap:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rank function and probe for tests/test_moe_convert.py (module level, so spawn can pickle them)."""

from __future__ import annotations

import zlib

import torch
from moe_cases import build, init_layout
from weights_cases import _save_model_part, as_bytes, forward_logits, load_model_part


def perturb(chunks, ep_rank: int) -> None:
    """Add small noise to every parameter, seeded by its *global* name, so replicas (dense
    parameters on every EP rank) move identically and the weights differ from the converted ones."""
    from dapo_megatron.weights.reshard import local_params

    with torch.no_grad():
        for name, p in local_params(chunks, ep_rank).items():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def train_side_case(rank: int, world_size: int, hf_dir: str, ckpt: str, save_dir: str, tokens: torch.Tensor) -> bytes:
    """World of ``ep`` ranks at EP = world: load the converted ``ckpt`` as the trainer does (strict
    dist-checkpoint load), take logits; perturb the weights, take logits and the rank-0 HF gather
    (``iter_hf_weights``), and save the model part at this EP to ``save_dir``."""
    return checkpoint_round(rank, hf_dir, ckpt, save_dir, tokens, lambda: init_layout(world_size, ep=world_size))


def checkpoint_round(rank: int, hf_dir: str, ckpt: str, save_dir: str, tokens: torch.Tensor, layout) -> bytes:
    """The steps of :func:`train_side_case` in the parallel layout ``layout()`` returns (a Topology,
    megatron initialised for it): tests/moe_etp_cases runs them at expert tensor parallelism 2."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, shutdown
    from dapo_megatron.weights.reshard import iter_hf_weights

    init_distributed()
    spec = model_spec_from_hf(hf_dir)
    topology = layout()
    chunks = build(spec, topology)
    load_model_part(chunks, ckpt)
    loaded = forward_logits(chunks, tokens, spec.vocab_size)
    perturb(chunks, ps.get_expert_model_parallel_rank())
    trained = forward_logits(chunks, tokens, spec.vocab_size)
    gathered = dict(iter_hf_weights(chunks, spec, topology))
    _save_model_part(chunks, save_dir)
    shutdown()
    return as_bytes({"loaded": loaded, "trained": trained, "gathered": gathered if rank == 0 else None})


# Runs export_hf.export in a fresh interpreter and reports the peak bytes of the tensors the exporter
# holds: every tensor _load_items returns (megatron layout) and every HF tensor the writer receives is
# counted from creation until garbage (weakref finalizers on the tensor objects, per storage).
EXPORT_MEMORY_PROBE = r"""
import sys, weakref
import dapo_megatron.weights.export_hf as ex

live, peak, refs = {}, [0], {}


def track(t):
    key = t.untyped_storage().data_ptr()
    if key not in live:
        live[key] = t.untyped_storage().nbytes()
        refs[key] = 0
        peak[0] = max(peak[0], sum(live.values()))
    refs[key] += 1

    def release(key=key):
        refs[key] -= 1
        if refs[key] == 0:
            del live[key], refs[key]

    weakref.finalize(t, release)
    return t


real_load, real_iter = ex._load_items, ex.iter_hf_tensors


def load_items(*a, **k):
    out = real_load(*a, **k)
    for t in out.values():
        track(t)
    return out


def iter_hf(*a, **k):
    for name, t in real_iter(*a, **k):
        yield name, track(t)


ex._load_items, ex.iter_hf_tensors = load_items, iter_hf
ex.export(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_bytes=int(sys.argv[4]), progress=False)
print("PEAK_HELD", peak[0])
"""

"""Rank functions and tiny-model helpers for the weights tests (module level, so spawn can pickle them).

Every ``*_case(rank, world_size, ...)`` runs inside :func:`tests.distributed_harness.run_distributed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

# ----------------------------------------------------------------------------- tiny HF models
# (model_type, GQA ratio, tied, vocab): vocab 250 is not a multiple of 128, so it needs padding.
TINY_CASES = {
    "qwen2_gqa2_untied": dict(model_type="qwen2", heads=4, kv_heads=2, tied=False, vocab=250),
    "qwen3_gqa4_tied": dict(model_type="qwen3", heads=4, kv_heads=1, tied=True, vocab=256),
    "llama_gqa1_untied": dict(model_type="llama", heads=4, kv_heads=4, tied=False, vocab=250),
}


def tiny_hf_config(model_type: str, heads: int, kv_heads: int, tied: bool, vocab: int, layers: int = 4):
    """A transformers config built in code (no download); head_dim 16, fp32."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[model_type]
    kwargs = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if model_type == "qwen3":
        kwargs["head_dim"] = 16
    return cls(**kwargs, dtype="float32")


def make_tiny_hf_model(folder: str, case: str, seed: int = 0, layers: int = 4) -> Dict[str, torch.Tensor]:
    """Save a random tiny model of ``TINY_CASES[case]`` to ``folder``; return its state dict.

    Norm weights and biases are randomised too (the defaults are all ones/zeros, which would hide
    a swapped or dropped tensor).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**TINY_CASES[case], layers=layers)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    _write_tokenizer_files(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write_tokenizer_files(folder: str) -> None:
    """Stand-in tokenizer files: the export copies them, the test checks they arrive unchanged."""
    Path(folder, "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    Path(folder, "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))


def hf_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    from dapo_megatron.weights.hf_io import HFReader

    with HFReader(folder) as r:
        return {n: r.get(n) for n in r.names()}


# ----------------------------------------------------------------------------- broadcast transport
def broadcast_case(rank: int, world_size: int, port: int, default_port: int) -> dict:
    """Rank 0: the trainer (with its own default group) sends 2 versioned buckets; rank 1 receives."""
    import torch.distributed as dist

    from dapo_megatron.weights.reshard import bucketize
    from dapo_megatron.weights.transports import (
        BroadcastReceiver,
        BroadcastSender,
        create_update_group,
        metas_of,
        tensor_checksum,
    )

    if rank == 0:  # the trainer's default group exists and stays untouched by the update group
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{default_port}", rank=0, world_size=1)
    group = create_update_group(master_address="127.0.0.1", master_port=port, world_size=world_size, rank=rank)
    weights = sample_weights()
    buckets = list(bucketize(weights, max_bytes=600))
    out: dict = {"versions": [], "checksums": []}
    if rank == 0:
        sender = BroadcastSender(group)
        for version, bucket in enumerate(buckets, start=7):
            sender.send_bucket(bucket, version)
            out["checksums"].append(tensor_checksum(bucket))
        # Out-of-band metadata variant (SGLang: names/dtypes/shapes arrive over HTTP).
        sender.send(buckets[0])
        dist.destroy_process_group()
    else:
        receiver = BroadcastReceiver(group)
        received: List[Tuple[str, torch.Tensor]] = []
        for _ in buckets:
            bucket, version = receiver.recv_bucket()
            out["versions"].append(version)
            out["checksums"].append(tensor_checksum(bucket))
            received += bucket
        again = receiver.recv(metas_of(buckets[0]))
        out["again_equal"] = all(torch.equal(a, b) for (_, a), (_, b) in zip(again, buckets[0]))
        out["received"] = received
    return as_bytes(out)


def as_bytes(obj) -> bytes:
    """Results travel as bytes: tensors in a torch.multiprocessing queue are shared by file
    descriptor, which breaks once the child exits before the parent reads them."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=False)


def sample_weights() -> List[Tuple[str, torch.Tensor]]:
    """Mixed dtypes and shapes, deterministic."""
    g = torch.Generator().manual_seed(5)
    return [
        ("model.embed_tokens.weight", torch.randn(10, 8, generator=g)),  # 320 B
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8, generator=g).bfloat16()),  # 128 B
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g)),
        ("big", torch.randn(200, generator=g)),  # 800 B > the 600 B bound: a bucket of its own
        ("model.norm.weight", torch.randn(8, generator=g).half()),
        ("step", torch.tensor([3], dtype=torch.int64)),
    ]


# ----------------------------------------------------------------------------- megatron layouts
def _init_layout(world_size: int, tp: int, pp: int, vpp: int = 1):
    from dapo_megatron.parallel.init import init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    topology = Topology(world_size, tp=tp, pp=pp, vpp=vpp)
    init_model_parallel(topology, seed=1234)
    return topology


def _build(spec, topology):
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.megatron.model import build_model_chunks

    return build_model_chunks(spec, topology, ModelConfig(params_dtype="float32", transformer_impl="local"))


def load_model_part(chunks, ckpt: str) -> None:
    """What ``checkpoint.load_checkpoint`` does for the weights: one sharded state dict per chunk
    (``model<i>``), ``dist_checkpointing.load``, ``load_state_dict``."""
    from megatron.core import dist_checkpointing

    state = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, ckpt)
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"])


def forward_logits(chunks, tokens: torch.Tensor, vocab: int):
    """Full-vocab logits ``[b, s, vocab]`` on the last stage's ranks, None elsewhere (PP by hand,
    no VPP): stage 0 sends its hidden states ``[s, b, h]`` to stage 1 of the same TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    (model,) = chunks
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    stage = ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        if stage > 0:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=pp_ranks[stage - 1])
            model.set_input_tensor(hidden)
        out = model(tokens, pos, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=pp_ranks[stage + 1])
            return None
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab]


def _reshard(chunks, spec, topology, max_bytes: int):
    """Rank 0: the streamed HF state dict and the bucket sizes; other ranks: the names they saw."""
    from dapo_megatron.weights.reshard import bucketize, iter_hf_weights

    buckets = list(bucketize(iter_hf_weights(chunks, spec, topology), max_bytes))
    named = [(n, t) for b in buckets for n, t in b]
    if torch.distributed.get_rank() != 0:
        return {"names": [n for n, _ in named], "tensors": [t for _, t in named]}
    sizes = [(len(b), sum(t.numel() * t.element_size() for _, t in b)) for b in buckets]
    return {"names": [n for n, _ in named], "state": dict(named), "buckets": sizes}


def layouts_case(rank: int, world_size: int, ckpt: str, hf_config: dict, layouts: list, tokens: torch.Tensor) -> bytes:
    """For each ``(tp, pp, vpp, what)`` layout: build, load ``ckpt``, then ``what`` in
    {"logits", "reshard"}. Parallel state is rebuilt between layouts; the default group stays."""
    from megatron.core import parallel_state

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    spec = model_spec_from_hf(hf_config)
    results = []
    for tp, pp, vpp, what in layouts:
        topology = _init_layout(world_size, tp, pp, vpp)
        chunks = _build(spec, topology)
        load_model_part(chunks, ckpt)
        if what == "logits":
            results.append(forward_logits(chunks, tokens, spec.vocab_size))
        else:
            results.append(_reshard(chunks, spec, topology, max_bytes=40_000))
        parallel_state.destroy_model_parallel()
    shutdown()
    return as_bytes(results)


def pure_mapping_case(rank: int, world_size: int, hf_dir: str, tokens: torch.Tensor) -> bytes:
    """World of one: load HF weights into a TP1 model through ``hf_to_megatron`` only (no checkpoint);
    return the logits, the state-dict shape check and the load_state_dict leftovers."""
    from dapo_megatron.megatron.model import model_spec_from_hf, padded_vocab_size
    from dapo_megatron.parallel.init import init_distributed, shutdown
    from dapo_megatron.weights import mapping
    from dapo_megatron.weights.hf_io import HFReader

    init_distributed()
    spec = model_spec_from_hf(hf_dir)
    (model,) = _build(spec, _init_layout(1, 1, 1))
    rows = padded_vocab_size(spec.vocab_size, 1)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with HFReader(hf_dir) as reader:
        converted = dict(mapping.hf_to_megatron(spec, reader.get, padded_vocab=rows))
    result = model.load_state_dict(converted, strict=False)
    out = {
        "shapes_match": built == mapping.megatron_shapes(spec, rows),
        "missing": [k for k in result.missing_keys if not k.endswith("_extra_state")],
        "unexpected": list(result.unexpected_keys),
        "logits": forward_logits([model], tokens, spec.vocab_size),
    }
    shutdown()
    return as_bytes(out)

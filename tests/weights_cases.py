"""Rank functions and tiny-model helpers for the weights tests (module level, so spawn can pickle them).

Every ``*_case(rank, world_size, ...)`` runs inside :func:`tests.distributed_harness.run_distributed`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

# ----------------------------------------------------------------------------- tiny HF models
# (model_type, GQA ratio, tied, vocab): vocab 250 is not a multiple of 128, so it needs padding.
TINY_CASES = {
    "qwen2_gqa2_untied": dict(model_type="qwen2", heads=4, kv_heads=2, tied=False, vocab=250),
    "qwen3_gqa4_tied": dict(model_type="qwen3", heads=8, kv_heads=2, tied=True, vocab=256),
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


def make_tiny_hf_model(
    folder: str, case: str, seed: int = 0, layers: int = 4, dtype: torch.dtype = torch.float32
) -> Dict[str, torch.Tensor]:
    """Save a random tiny model of ``TINY_CASES[case]`` in ``dtype`` to ``folder``; return its state dict.

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
    model.to(dtype).save_pretrained(folder)
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


REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str, timeout: float = 300):
    """Run a tools/ script in a fresh interpreter; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools" / args[0]), *args[1:], "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def prepare_models(root: Path) -> Dict[str, Dict[str, str]]:
    """For every tiny case: HF folder -> (CLI) megatron checkpoint -> (CLI) HF export, under ``root``.

    Idempotent (a finished case is reused), so several test modules share one preparation per
    session. Returns ``{case: {"hf": .., "ckpt": .., "export": ..}}``.
    """
    out = {}
    for case in TINY_CASES:
        paths = {k: str(root / case / k) for k in ("hf", "ckpt", "export")}
        if not Path(paths["export"]).is_dir():
            make_tiny_hf_model(paths["hf"], case)
            for cmd in (
                ("convert_hf_to_megatron.py", "--hf-dir", paths["hf"], "--out", paths["ckpt"], "--dtype", "float32"),
                (
                    "convert_megatron_to_hf.py",
                    "--ckpt",
                    paths["ckpt"],
                    "--hf-dir",
                    paths["hf"],
                    "--out",
                    paths["export"],
                ),
            ):
                done = run_tool(*cmd)
                assert done.returncode == 0, done.stderr[-3000:]
        out[case] = paths
    return out


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits from transformers (eager attention, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


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


def _save_model_part(chunks, path: str) -> str:
    """The weights part of ``checkpoint.save_checkpoint``: ``{"model<i>": sharded_state_dict}``."""
    import multiprocessing

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    # The harness starts ranks as daemon processes, and megatron's save starts a (spawned) queue
    # manager, which daemon processes may not do; the flag only matters for that check.
    multiprocessing.current_process().daemon = False
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    dist_checkpointing.save({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}, path)
    dist.barrier()
    return path


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


def layouts_case(rank: int, world_size: int, jobs: list, tokens: torch.Tensor) -> bytes:
    """For each job ``(ckpt, hf_config, [(tp, pp, vpp, what), ...])`` and each layout: build, load
    ``ckpt``, then ``what`` in {"logits", "reshard"}. Parallel state is rebuilt between layouts;
    the default group stays. Returns ``results[job][layout]``."""
    from megatron.core import parallel_state

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    results = []
    for ckpt, hf_config, layouts in jobs:
        spec = model_spec_from_hf(hf_config)
        per_job = []
        for tp, pp, vpp, what in layouts:
            topology = _init_layout(world_size, tp, pp, vpp)
            chunks = _build(spec, topology)
            load_model_part(chunks, ckpt)
            if what == "logits":
                per_job.append(forward_logits(chunks, tokens, spec.vocab_size))
            elif what.startswith("save:"):  # re-save as a training run at this layout would
                per_job.append(_save_model_part(chunks, what[len("save:") :]))
            else:
                per_job.append(_reshard(chunks, spec, topology, max_bytes=40_000))
            parallel_state.destroy_model_parallel()
        results.append(per_job)
    shutdown()
    return as_bytes(results)


def pure_mapping_case(rank: int, world_size: int, hf_dirs: list, tokens: torch.Tensor) -> bytes:
    """World of one: load HF weights into a TP1 model through ``hf_to_megatron`` only (no checkpoint);
    per folder, the logits, the state-dict shape check and the load_state_dict leftovers."""
    from megatron.core import parallel_state

    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    results = []
    for hf_dir in hf_dirs:
        results.append(_pure_mapping_one(hf_dir, tokens))
        parallel_state.destroy_model_parallel()
    shutdown()
    return as_bytes(results)


def _pure_mapping_one(hf_dir: str, tokens: torch.Tensor) -> dict:
    from dapo_megatron.megatron.model import model_spec_from_hf, padded_vocab_size
    from dapo_megatron.weights import mapping
    from dapo_megatron.weights.hf_io import HFReader

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
    return out


# ----------------------------------------------------------------------------- memory bound
MEDIUM = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=4096, hidden_size=512,
    intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
    rope_theta=10000.0, torch_dtype="float32",
)  # fmt: skip


def make_medium_hf_model(folder: str) -> int:
    """~310 MB fp32 model written tensor by tensor (never whole in memory); returns its bytes."""
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.weights import mapping
    from dapo_megatron.weights.hf_io import write_hf_folder

    shapes = mapping.hf_shapes(model_spec_from_hf(MEDIUM))
    g = torch.Generator().manual_seed(0)
    write_hf_folder(folder, ((n, torch.randn(s, generator=g)) for n, s in shapes.items()), config=MEDIUM,
                    max_shard_bytes=64 * 1024**2)  # fmt: skip
    return sum(4 * torch.Size(s).numel() for s in shapes.values())


# Run in a fresh interpreter: converts while a thread samples the anonymous (non-file) proportional
# resident memory of this process and its forked children (megatron's save forks tensor writers),
# and prints the peak growth over the level just before the conversion. Spawned helpers (a queue
# manager, the resource tracker) are fresh interpreters whose size does not depend on the model.
MEMORY_PROBE = r"""
import importlib.util, sys, threading, time, psutil


def anon():
    total = 0
    procs = [psutil.Process()]
    try:
        procs += psutil.Process().children(recursive=True)
    except psutil.Error:
        pass
    for p in procs:
        try:
            if "--multiprocessing-fork" in p.cmdline() or "resource_tracker" in " ".join(p.cmdline()):
                continue  # spawned helpers (queue manager, tracker): fresh interpreters, never given tensors
            # Pss_Anon: forked writers share the parent's pages copy-on-write; PSS counts them once.
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("Pss_Anon:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


def main():
    spec = importlib.util.spec_from_file_location("conv", sys.argv[1])
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    import megatron.core.dist_checkpointing  # import cost is not the conversion's

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    base = anon()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    conv.convert(sys.argv[2], sys.argv[3], "float32", progress=False)
    stop.set()
    t.join()
    print("PEAK_GROWTH", peak[0] - base)


if __name__ == "__main__":
    main()
"""

#!/usr/bin/env python
"""Convert an HF model folder (Qwen2 / Qwen3 / Llama / Qwen3-MoE) into a megatron-core dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --out ckpt/qwen7b   # keeps the source's dtype
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py ...   # or under srun: ranks split layers

The output is a torch_dist checkpoint with megatron's *global* keys (see
``dapo_megatron/weights/dist_layout.py``; routed experts with a global expert axis, see
``expert_layout.py``), written as if saved at TP=1/PP=1/EP=1, so any TP/PP/VPP/EP layout loads it
(dist_checkpointing reshards), plus ``conversion.json`` (source config, dtype, padded
vocab). It holds model weights only: no optimizer, scheduler or step.

dtype: by default the source's (the one floating dtype its safetensors hold, else config.json's
``torch_dtype``), printed at start, so that converting and exporting with default flags gives back
the source bit for bit (the exporter defaults to the source's dtype as well); ``--dtype`` casts.

Order of work: every check happens before anything is written (files and headers readable, the
architecture supported, every tensor present with the shape the config implies, no stray layer
tensors); then the tensors are converted one at a time into a temporary sibling folder
``<out>.tmp-<nonce>``, which is renamed onto ``<out>`` only when the save completed. A failure
removes it, so bad input never leaves an output folder.

Memory bound (per rank): megatron's ``dist_checkpointing.save`` wants the whole state dict at once.
The converted tensors are therefore written into file-backed shared mappings (a scratch folder
``<out>.tmp-<nonce>.scratch``, removed at the end) and the state dict references those: their pages
are page cache, which the kernel writes back and evicts under pressure. Anonymous (unevictable)
memory holds at most the HF input tensors of one item plus a dtype-cast copy: at most
``2 x`` the largest of {embedding, q+k+v, gate+up} of one layer (Qwen2.5-32B in bf16: the
1.56 GB embedding, so about 3.2 GB), independent of the number of layers; a MoE layer's routed
experts are converted one expert (gate+up, then down) at a time. Disk: the scratch copy
plus the output, about twice the model size. Under torchrun/srun each rank converts a contiguous
block of layers (rank 0 also the embedding, the last rank the final norm and output layer).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from dapo_megatron.errors import InputError, report_input_errors
from dapo_megatron.weights import expert_layout, mapping
from dapo_megatron.weights.hf_io import HFReader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT = "dapo_megatron/megatron-dist-checkpoint/v1"
META_FILE = "conversion.json"
# HF tensors that carry no weights (recomputed buffers in some older exports).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(InputError):
    """The input cannot be converted; the message says which file / tensor / setting."""


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="dtype of the saved weights (default: the source's, so a round trip is exact)")  # fmt: skip
    p.add_argument(
        "--vocab-tp",
        type=int,
        default=1,
        help="pad the vocabulary as the model builder does at this TP degree (default 1); the checkpoint\n"
        "loads at every TP whose padded vocabulary is the same (conversion.json lists them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- validation (no writes)
def load_and_validate(hf_dir: str) -> tuple[HFReader, Any]:
    """Open the folder and check it completely against the config; return (reader, spec)."""
    from dapo_megatron.megatron.model import model_spec_from_hf

    reader = HFReader(hf_dir)
    try:
        spec = model_spec_from_hf(reader.config)
        mapping.check_spec(spec)
        expert_layout.check_supported(spec)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    expected = mapping.hf_shapes(spec)
    if spec.tied_embeddings:
        expected.pop(mapping.arch_mapping(spec.model_type).lm_head, None)
    reader.check_shapes(expected)
    # A tied model may still ship an lm_head copy; it is the embedding, so it is not stray.
    ignorable = {mapping.arch_mapping(spec.model_type).lm_head} if spec.tied_embeddings else set()
    stray = [
        n for n in reader.names() if n not in expected and n not in ignorable and not n.endswith(_IGNORABLE_SUFFIXES)
    ]
    if stray:
        raise ConversionError(
            f"{hf_dir}: tensors the config does not account for (wrong num_hidden_layers or architecture?): "
            f"{stray[:5]}{' ...' if len(stray) > 5 else ''}"
        )
    return reader, spec


def source_dtype(reader: HFReader) -> tuple[str, str]:
    """``(dtype name, where it came from)`` of the source: the single floating dtype of its tensors
    (headers only), else config.json's ``torch_dtype`` / ``dtype`` when the files mix dtypes."""
    names = {str(d).removeprefix("torch.") for d in {reader.dtype(n) for n in reader.names()} if d.is_floating_point}
    if len(names) == 1 and next(iter(names)) in DTYPES:
        return next(iter(names)), "the source's tensors"
    declared = reader.config.get("torch_dtype") or reader.config.get("dtype")
    if len(names) > 1 and declared in DTYPES:
        return declared, f"config.json torch_dtype; the tensors mix {sorted(names)}"
    raise ConversionError(
        f"{reader.hf_dir}: cannot tell the source dtype (tensors: {sorted(names)}, config.json: {declared!r}); "
        f"pass --dtype, one of {sorted(DTYPES)}"
    )


def padded_vocab(spec: Any, vocab_tp: int) -> int:
    """Vocab rows of the checkpoint: the builder's padding at TP ``vocab_tp``."""
    from dapo_megatron.megatron.model import padded_vocab_size

    return padded_vocab_size(spec.vocab_size, vocab_tp)


def loadable_tps(spec: Any, rows: int) -> List[int]:
    """TP degrees (powers of two up to 64) whose builder pads the vocabulary to exactly ``rows``:
    dist_checkpointing needs identical global shapes, so only those layouts load the embedding."""
    from dapo_megatron.megatron.model import padded_vocab_size

    return [tp for tp in (1, 2, 4, 8, 16, 32, 64) if padded_vocab_size(spec.vocab_size, tp) == rows]


# ----------------------------------------------------------------------------- conversion
def rank_plan(spec: Any, rank: int, world: int) -> List[mapping.ConvItem]:
    """The items rank ``rank`` of ``world`` converts: a contiguous block of layers, rank 0 the
    embedding, the last rank the final norm and output layer."""
    per, extra = divmod(spec.num_layers, world)
    start = rank * per + min(rank, extra)
    layers = range(start, start + per + (1 if rank < extra else 0))
    return mapping.conversion_plan(spec, layers=layers, include_pre=rank == 0, include_post=rank == world - 1)


def _fill(arena: Any, item: mapping.ConvItem, hf: List[torch.Tensor], spec: Any, vocab_rows: int, dtype):
    """Write ``item``'s megatron tensor straight into file-backed memory; return what to save.

    For linear_fc1 the gate and up halves get separate files (see dist_layout.sharded_tensors).
    """
    if item.kind == mapping.FC1:
        parts = []
        for t in hf:
            out = arena.empty(t.shape, dtype)
            out.copy_(t)
            parts.append(out)
        return tuple(parts)
    if item.kind == mapping.VOCAB:
        out = arena.empty((vocab_rows, *hf[0].shape[1:]), dtype)
        out[: hf[0].shape[0]].copy_(hf[0])
        out[hf[0].shape[0] :].zero_()
        return out
    full = mapping.to_megatron(spec, item, hf, vocab_rows)  # QKV merge (new tensor) or the input
    out = arena.empty(full.shape, dtype)
    out.copy_(full)
    return out


def convert_items(reader: HFReader, spec: Any, items: List[mapping.ConvItem], arena: Any, dtype, vocab_rows: int,
                  progress: bool) -> Dict[str, Any]:  # fmt: skip
    """Sharded state dict (this rank's part) of ``items``; tensors live in ``arena``."""
    from tqdm import tqdm

    sharded: Dict[str, Any] = {}
    done_layers = set()
    for item in tqdm(items, desc="hf->megatron", unit="tensor", disable=not progress, file=sys.stderr):
        hf = [reader.get(n) for n in item.hf_names]
        data = _fill(arena, item, hf, spec, vocab_rows, dtype)
        del hf  # the bound: only this item's inputs are ever resident
        for k, st in enumerate(expert_layout.sharded_tensors(item.megatron_name, data, spec)):
            sharded[f"{item.megatron_name}#{k}"] = st
        if item.layer is not None and item.layer not in done_layers:
            done_layers.add(item.layer)
            for k, obj in enumerate(expert_layout.extra_state_objects(item.layer, spec)):
                sharded[f"layer{item.layer}.extra{k}"] = obj
    return sharded


# ----------------------------------------------------------------------------- process group + output
def _init_process_group() -> tuple[int, int, bool]:
    """(rank, world, created): torchrun/srun ranks join their world; a lone process makes a
    private world of one (in-memory store, no port)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    from dapo_megatron.parallel.init import dist_env_from_environ, init_distributed

    env = dist_env_from_environ(os.environ)
    if env.world_size > 1:
        init_distributed(env, backend="gloo")  # applies the CPU compatibility layer when needed
    else:
        from dapo_megatron.parallel.cpu_compat import apply_cpu_compat, needs_cpu_compat

        if needs_cpu_compat():  # megatron's save calls torch.cuda.synchronize()
            apply_cpu_compat()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return env.rank, env.world_size, True


def _broadcast_str(value: str) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_meta(folder: Path, spec: Any, config: dict, dtype: str, vocab_rows: int) -> None:
    meta = {
        "format": FORMAT,
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "num_experts": spec.moe.num_experts if getattr(spec, "moe", None) is not None else 0,
        "vocab_size": spec.vocab_size,
        "padded_vocab_size": vocab_rows,
        "dtype": dtype,
        "loads_at_tp": loadable_tps(spec, vocab_rows),
        "hf_config": config,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def convert(hf_dir: str, out: str, dtype: str | None = None, *, vocab_tp: int = 1, progress: bool = True) -> str:
    """Collective over the ranks of the launcher (or a private world of one): write ``out``.

    ``dtype`` None keeps the source's (:func:`source_dtype`). Returns the dtype written.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from dapo_megatron.weights.dist_layout import ScratchArena

    out_path = Path(out)
    if out_path.exists():
        raise ConversionError(f"{out}: output already exists; refusing to overwrite")
    reader, spec = load_and_validate(hf_dir)
    why = "--dtype"
    if dtype is None:
        dtype, why = source_dtype(reader)
    print(f"convert_hf_to_megatron: dtype {dtype} ({why})", file=sys.stderr)
    vocab_rows = padded_vocab(spec, vocab_tp)
    rank, world, created = _init_process_group()
    tmp = out_path.with_name(f"{out_path.name}.tmp-{_broadcast_str(secrets.token_hex(4))}")
    scratch = tmp.with_name(tmp.name + ".scratch")
    try:
        if rank == 0:
            tmp.mkdir(parents=True)
        dist.barrier()
        # Scratch next to (not inside) the checkpoint folder: megatron's save expects its own folder.
        arena = ScratchArena(str(scratch / f"rank{rank}"))
        items = rank_plan(spec, rank, world)
        sharded = convert_items(reader, spec, items, arena, DTYPES[dtype], vocab_rows, progress and rank == 0)
        dist_checkpointing.save(sharded, str(tmp))
        del sharded, arena
        dist.barrier()
        if rank == 0:
            shutil.rmtree(scratch)
            _write_meta(tmp, spec, reader.config, dtype, vocab_rows)
            os.replace(tmp, out_path)
        dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        reader.close()
        if created:
            dist.destroy_process_group()
    return dtype


def main(argv: List[str] | None = None) -> int:
    """Convert as ``argv`` says; 0 on success, 2 with one line naming the input on bad input."""
    args = parse_args(argv)

    def run() -> int:
        convert(args.hf_dir, args.out, args.dtype, vocab_tp=args.vocab_tp, progress=not args.no_progress)
        print(f"convert_hf_to_megatron: wrote {args.out}", file=sys.stderr)
        return 0

    return report_input_errors("convert_hf_to_megatron", run)


if __name__ == "__main__":  # megatron's save starts helper processes with spawn: keep this guard
    sys.exit(main())

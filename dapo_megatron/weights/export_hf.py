"""Export a megatron dist checkpoint (a training checkpoint at any layout, or a converted one) to HF.

    dapo-megatron export --ckpt runs/x/checkpoints/step_100 --hf-dir Qwen2.5-7B \\
        --out exported/step_100 --dtype bfloat16

``--hf-dir`` is the HF folder the run started from: its ``config.json`` describes the architecture
(the checkpoint stores only tensors), and its ``generation_config.json`` and tokenizer files are
copied. The output folder has ``config.json`` (the source config with the dtype updated),
``generation_config.json``, safetensors shards with an index, and the tokenizer files; it loads
with ``transformers.AutoModelForCausalLM.from_pretrained`` unchanged.

Streaming: the checkpoint is read one transformer layer at a time, and a MoE layer's routed experts
as a group of their own (dist_checkpointing loads just the requested global slices, whatever
TP/PP/EP layout saved them; experts are stored by global index), and the shard writer writes each
tensor as it arrives, so memory is bounded by one layer (or one layer's experts), whatever
``--max-shard-size``. Qwen3-MoE exports to per-expert HF names that
``transformers.Qwen3MoeForCausalLM`` loads. Only the
model weights are read; optimizer state in a training checkpoint is ignored. The output folder is
written atomically (temporary sibling, renamed at the end; removed on failure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import torch

from dapo_megatron.errors import InputError, report_input_errors
from dapo_megatron.weights import expert_layout, mapping
from dapo_megatron.weights.hf_io import read_hf_config, write_hf_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


class ExportError(InputError):
    """The checkpoint does not match the architecture, or an input is missing."""


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_export_args(p)
    return p.parse_args(argv)


def add_export_args(p: argparse.ArgumentParser) -> None:
    """The export options (shared by this tool and ``dapo-megatron export``)."""
    p.add_argument("--ckpt", required=True, help="megatron dist checkpoint folder")
    p.add_argument("--hf-dir", required=True, help="source HF folder (config, generation config, tokenizer)")
    p.add_argument("--out", required=True, help="output HF folder (must not exist)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="output dtype (default: the source's)")
    p.add_argument("--max-shard-size", type=int, default=5 * 1024**3, help="bytes per safetensors shard")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _source_dtype(config: dict) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return name if name in DTYPES else "bfloat16"


def output_config(config: dict, dtype: str) -> dict:
    """The source config with its dtype fields (v4 ``torch_dtype``, v5 ``dtype``) set to ``dtype``."""
    out = dict(config)
    out["torch_dtype"] = dtype
    if "dtype" in out or "transformers_version" in out:
        out["dtype"] = dtype
    return out


def generation_config(hf_dir: Path, config: dict) -> dict:
    """The source's generation_config.json, or one made from the config's token ids."""
    path = hf_dir / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


# ----------------------------------------------------------------------------- checkpoint reading
def checkpoint_vocab_rows(metadata: Dict[str, Any], spec: Any) -> int:
    """Validate the checkpoint's tensors against ``spec``; return the padded vocab rows."""
    emb = metadata.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ExportError("checkpoint has no 'embedding.word_embeddings.weight' (not a GPT model checkpoint?)")
    rows = emb.global_shape[0]
    if rows < spec.vocab_size:
        raise ExportError(f"checkpoint embedding has {rows} rows < the config's vocab_size={spec.vocab_size}")
    for name, shape in mapping.megatron_shapes(spec, rows).items():
        key = expert_layout.checkpoint_key(name)[0]
        want = expert_layout.global_shape(name, shape, spec)
        found = metadata.get(key)
        if found is None:
            raise ExportError(f"checkpoint lacks tensor {key!r} that the config implies")
        if tuple(found.global_shape) != want:
            raise ExportError(
                f"checkpoint tensor {key!r} has shape {list(found.global_shape)}, config implies {list(want)}"
            )
    return rows


def _load_items(ckpt: str, items: List[mapping.ConvItem], spec: Any, rows: int, metadata) -> Dict[str, torch.Tensor]:
    """Full (TP=1) tensors of ``items`` read from ``ckpt`` (only those slices are read).

    Each tensor is allocated once, at its final shape, and the load fills it in place (linear_fc1's
    gate and up pieces are its two row blocks), so the group is held once, never twice.
    """
    from megatron.core import dist_checkpointing

    shapes = mapping.megatron_shapes(spec, rows)
    request: Dict[str, Any] = {}
    targets: Dict[str, torch.Tensor] = {}
    out: Dict[str, torch.Tensor] = {}
    for item in items:
        dtype = metadata[expert_layout.checkpoint_key(item.megatron_name)[0]].dtype
        full = out[item.megatron_name] = torch.empty(shapes[item.megatron_name], dtype=dtype)
        pieces = full.chunk(2, dim=0) if item.kind == mapping.FC1 else (full,)  # contiguous row blocks
        sharded = expert_layout.sharded_tensors(item.megatron_name, pieces if len(pieces) > 1 else full, spec,
                                                explicit_axes=True)  # fmt: skip
        for k, (st, piece) in enumerate(zip(sharded, pieces)):
            request[f"{item.megatron_name}#{k}"] = st
            targets[f"{item.megatron_name}#{k}"] = piece
    # A per-layer request covers only part of each global tensor: skip the whole-tensor coverage check.
    loaded = dist_checkpointing.load(request, ckpt, validate_access_integrity=False)
    for key, piece in targets.items():
        got = loaded.pop(key)
        if got.data_ptr() != piece.data_ptr():  # not filled in place by this megatron version: copy
            piece.copy_(got.view(piece.shape))
        del got
    return out


def read_groups(spec: Any) -> List[List[mapping.ConvItem]]:
    """The conversion plan cut into the groups read one at a time: the embedding; per layer its
    attention, norms and router, then (MoE) its routed experts; the final norm and output layer.

    Each group's tensors are all that the reader holds, so the peak is the largest group: for a MoE
    model one layer's experts (``E * 3 * ffn_e * h`` elements), not the layer plus its experts.
    """
    groups = [mapping.conversion_plan(spec, layers=[], include_post=False)]
    for i in range(spec.num_layers):
        layer = mapping.conversion_plan(spec, layers=[i], include_pre=False, include_post=False)
        groups.append([item for item in layer if item.expert is None])
        experts = [item for item in layer if item.expert is not None]
        if experts:
            groups.append(experts)
    groups.append(mapping.conversion_plan(spec, layers=[], include_pre=False))
    return groups


def iter_hf_tensors(ckpt: str, spec: Any, dtype: torch.dtype, progress: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF tensors of the checkpoint, one :func:`read_groups` group at a time, in conversion-plan order."""
    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    rows = checkpoint_vocab_rows(metadata, spec)
    index = mapping.conversion_index(spec)
    groups = read_groups(spec)
    for items in tqdm(groups, desc="megatron->hf", unit="group", disable=not progress, file=sys.stderr):
        tensors = _load_items(ckpt, items, spec, rows, metadata)
        for item in items:
            parts = mapping.megatron_to_hf(spec, item.megatron_name, tensors.pop(item.megatron_name), index)
            while parts:  # pop: no local name keeps a handed-over tensor alive while the next is made
                hf_name = parts[0][0]
                yield hf_name, parts.pop(0)[1].to(dtype)


# ----------------------------------------------------------------------------- main
def _init_process_group() -> bool:
    """A private world of one (dist_checkpointing needs a process group); True if created here."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    from dapo_megatron.parallel.cpu_compat import apply_cpu_compat, needs_cpu_compat

    if needs_cpu_compat():
        apply_cpu_compat()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _verify(ckpt: str) -> None:
    """Name a missing, truncated or code-carrying checkpoint file before megatron reads any of it."""
    from dapo_megatron.megatron.ckpt_files import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(ckpt, weights_only=True)  # only weights are exported: an old meta.pt is never read
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def _check_tokenizer_fits(src: Path, spec: Any, ckpt: str) -> None:
    """Refuse a ``--hf-dir`` tokenizer with more tokens than the model's vocabulary or the checkpoint's
    embedding rows: the exported folder would pair ids with no embedding (before anything is written)."""
    from megatron.core import dist_checkpointing

    from dapo_megatron.weights.tokenizer_fit import tokenizer_problem, tokenizer_size

    try:
        tokens = tokenizer_size(str(src))
    except ValueError as e:
        raise ExportError(str(e)) from None
    if tokens is None:  # no vocabulary file: nothing to pair (the folder ships no tokenizer)
        return
    rows = checkpoint_vocab_rows(dist_checkpointing.load_tensors_metadata(ckpt), spec)
    problem = tokenizer_problem(tokens, spec.vocab_size, source=f"--hf-dir {src}", rows=rows)
    if problem:
        raise ExportError(problem)


def export(ckpt: str, hf_dir: str, out: str, dtype: str | None = None, *, max_shard_bytes: int = 5 * 1024**3,
           progress: bool = True) -> None:  # fmt: skip
    """Write the HF folder ``out`` from ``ckpt`` using ``hf_dir``'s config and tokenizer."""
    import torch.distributed as dist

    from dapo_megatron.megatron.model import model_spec_from_hf

    src = Path(hf_dir)
    config = read_hf_config(src)
    try:
        spec = model_spec_from_hf(config)
        mapping.check_spec(spec)
        expert_layout.check_supported(spec)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{src / 'config.json'}: {e}") from None
    _verify(ckpt)
    dtype = dtype or _source_dtype(config)
    created = _init_process_group()
    try:
        _check_tokenizer_fits(src, spec, ckpt)
        write_hf_folder(
            out,
            iter_hf_tensors(ckpt, spec, DTYPES[dtype], progress),
            config=output_config(config, dtype),
            extra_json={"generation_config.json": generation_config(src, config)},
            copy_files=[src / f for f in TOKENIZER_FILES if (src / f).is_file()],
            max_shard_bytes=max_shard_bytes,
        )
    finally:
        if created:
            dist.destroy_process_group()


def main(argv: List[str] | None = None) -> int:
    return run_export(parse_args(argv))


def run_export(args: argparse.Namespace) -> int:
    """Export as the parsed ``args`` say; 0 on success, 2 with a one-line error on bad input."""

    def run() -> int:
        try:
            export(args.ckpt, args.hf_dir, args.out, args.dtype, max_shard_bytes=args.max_shard_size,
                   progress=not args.no_progress)  # fmt: skip
        except FileExistsError as e:  # the output folder exists: refused, never overwritten
            raise InputError(str(e)) from None
        print(f"convert_megatron_to_hf: wrote {args.out}", file=sys.stderr)
        return 0

    return report_input_errors("convert_megatron_to_hf", run)

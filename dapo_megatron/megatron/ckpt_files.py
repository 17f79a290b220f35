"""A checkpoint folder's file set: recorded at save time, checked before anything reads it.

``meta.json`` (written by rank 0 after every rank finished writing, before the atomic publish)
holds ``files``: every other file's path relative to the folder and its size in bytes.
:func:`verify_checkpoint` checks, before megatron opens anything:

1. no legacy ``meta.pt`` stands in for ``meta.json`` (it is a pickle: loading it could run code);
2. every recorded file exists with its recorded size (a missing or truncated ``.distcp``,
   ``common.pt`` or RNG file is named with the expected and found size);
3. torch's ``.metadata`` -- which megatron reads with plain ``pickle.load`` -- holds only the
   checkpoint-metadata classes of an allowlist (so no code runs when megatron unpickles it), and
   every ``.distcp`` it points into is at least as long as the last byte it indexes; this also
   covers converted checkpoints that have no ``meta.json``;
4. megatron's ``common.pt`` loads with ``torch.load(weights_only=True)``. Megatron itself loads it
   with torch's default, which is weights-only since torch 2.6 unless the environment variable
   ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; our explicit ``weights_only=True`` ignores that
   variable, so a code-carrying ``common.pt`` is refused here either way.

Every failure is a :class:`CheckpointError` that names the folder and the file.
Limit: a file replaced between this check and megatron's read (a local writer racing the loader)
is not covered; sizes, not checksums, are compared (hashing every shard would cost a full read).
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, Optional

META = "meta.json"
LEGACY_META = "meta.pt"
META_FORMAT = 2  # format 1 was the pickled meta.pt
_DCP_METADATA = ".metadata"
_COMMON = "common.pt"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded safely: old pickle format, missing or truncated file."""


def _legacy_error(folder: str) -> CheckpointError:
    return CheckpointError(
        f"{os.path.join(folder, LEGACY_META)}: a checkpoint of an older dapo_megatron stores its step and "
        "extra state as a pickle, which can run code when loaded, so it is not read. Its weights still "
        f"load: start a new run from them with model.load={folder} run.resume=false (optimizer, scheduler, "
        "sampler and RNG state start fresh), or export it with `dapo-megatron export --ckpt`"
    )


def file_sizes(folder: str) -> Dict[str, int]:
    """``{relative posix path: bytes}`` of every file under ``folder`` except ``meta.json`` itself."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel != META and ".tmp-" not in name:  # our atomic writes' leftovers are not part of it
                sizes[rel] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def read_meta(folder: str, *, legacy_ok: bool = False) -> Optional[Dict[str, Any]]:
    """``meta.json`` of ``folder``, or None when there is none (a converted, weights-only checkpoint).

    Raises :class:`CheckpointError` for a legacy ``meta.pt`` without ``meta.json`` (never unpickled;
    ``legacy_ok`` returns None instead, for loads of the weights alone) and for a ``meta.json``
    that is not the expected JSON object.
    """
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        if not legacy_ok and os.path.exists(os.path.join(folder, LEGACY_META)):
            raise _legacy_error(folder)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: expected a JSON object with format={META_FORMAT} and a 'files' table")
    return meta


def verify_checkpoint(folder: str, *, weights_only: bool = False) -> Optional[Dict[str, Any]]:
    """Check ``folder`` as the module docstring says; return its ``meta.json`` (None if it has none).

    ``weights_only=True`` (loading the weights alone, or exporting) accepts an old-format folder:
    its ``meta.pt`` is never read, and megatron's files are checked through ``.metadata``.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    meta = read_meta(folder, legacy_ok=weights_only)
    if meta is not None:
        for rel, size in meta["files"].items():
            _check_size(folder, rel, int(size), exact=True)
    elif not os.path.isfile(os.path.join(folder, "metadata.json")):
        raise CheckpointError(f"{folder}: not a megatron dist checkpoint (no metadata.json and no {META})")
    for rel, end in dcp_extents(folder).items():
        _check_size(folder, rel, end, exact=False)
    _check_common(folder)
    return meta


def _check_size(folder: str, rel: str, expected: int, *, exact: bool) -> None:
    path = os.path.join(folder, *rel.split("/"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder}: file {rel} is missing (expected {expected} bytes)")
    found = os.path.getsize(path)
    if found != expected if exact else found < expected:
        want = f"{expected} bytes" if exact else f"at least {expected} bytes"
        raise CheckpointError(f"checkpoint {folder}: file {rel} is truncated or altered: expected {want}, "
                              f"found {found} bytes")  # fmt: skip


def _check_common(folder: str) -> None:
    import megatron.core  # noqa: F401 - registers megatron's own classes as weights-only safe
    import torch

    path = os.path.join(folder, _COMMON)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder}: file {_COMMON} is missing")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure: this file cannot be loaded as data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {folder}: file {_COMMON} does not load as plain data: {first}") from None


# ----------------------------------------------------------------------------- torch's .metadata
# The classes a torch_dist ``.metadata`` pickle is made of (torch 2.x). Constructing any of them
# only stores fields; ``_get_layout`` looks a layout up by name. Nothing here runs a command.
_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    f"{_DCP}metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                        "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    f"{_DCP}filesystem": {"_StorageInfo"},
    f"{_DCP}planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only the classes of ``_ALLOWED``, ``torch.Size`` and torch dtypes; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never holds")


def dcp_extents(folder: str) -> Dict[str, int]:
    """``{.distcp file: end of its last indexed byte}`` from ``folder/.metadata``, read safely."""
    path = os.path.join(folder, _DCP_METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder}: file {_DCP_METADATA} is missing (torch_dist index)")
    try:
        with open(path, "rb") as f:
            metadata = _AllowlistUnpickler(f).load()
        storage = metadata.storage_data
        ends: Dict[str, int] = {}
        for info in storage.values():
            end = int(info.offset) + int(info.length)
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
    except Exception as e:  # noqa: BLE001 - refused, malformed or truncated: all unloadable
        raise CheckpointError(f"checkpoint {folder}: file {_DCP_METADATA} is not a torch_dist index "
                              f"made of data only: {e}") from None  # fmt: skip
    for rel in ends:  # paths come from the file: keep them inside the folder
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise CheckpointError(f"checkpoint {folder}: file {_DCP_METADATA} points outside the folder: {rel!r}")
    return ends

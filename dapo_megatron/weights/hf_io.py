"""Streaming read and atomic write of HF model folders (``config.json`` + safetensors).

Reading never loads a whole shard: :class:`HFReader` memory-maps each shard with ``safe_open`` and
copies out one tensor per :meth:`HFReader.get` call. Every failure names the file (and the tensor
where there is one): a missing shard, a truncated or corrupt file, a missing tensor, a shape that
disagrees with the config.

Writing (:func:`write_hf_folder`) streams named tensors, one at a time, into size-bounded shards inside a temporary
sibling folder ``<out>.tmp-<nonce>`` and renames it onto ``<out>`` only when everything is written;
on any error the temporary folder is removed, so a failed run leaves no output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from dapo_megatron.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class HFCheckpointError(InputError):
    """An HF folder is missing a file or tensor, or a file is unreadable or inconsistent."""


def read_hf_config(hf_dir: Union[str, Path]) -> dict:
    """``config.json`` of ``hf_dir`` as a dict (clear error when absent or not JSON)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{path}: config.json not found (is {hf_dir} an HF model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise HFCheckpointError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON model config") from None


def _weight_map(hf_dir: Path) -> Dict[str, str]:
    """Tensor name -> shard file name, from the index or from the single file's header."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HFCheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        missing = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
        if missing:
            raise HFCheckpointError(f"{index}: shard file(s) missing from {hf_dir}: {', '.join(missing)}")
        return dict(weight_map)
    if (hf_dir / SINGLE_FILE).is_file():
        return dict.fromkeys(_open(hf_dir / SINGLE_FILE).keys(), SINGLE_FILE)
    raise HFCheckpointError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _open(path: Path):
    """``safe_open`` with the file named in any error. safetensors checks at open time that the
    header parses and that the data section covers every tensor, which catches truncation."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


class HFReader:
    """Lazy tensor access to an HF folder (single or sharded safetensors).

    Opening validates the index and every shard header (cheap: headers only). Each shard stays
    memory-mapped; :meth:`get` materialises one tensor, so resident memory is bounded by the
    tensors the caller keeps alive.
    """

    def __init__(self, hf_dir: Union[str, Path]):
        self.hf_dir = Path(hf_dir)
        self.config = read_hf_config(self.hf_dir)
        self.weight_map = _weight_map(self.hf_dir)
        self._handles = {f: _open(self.hf_dir / f) for f in sorted(set(self.weight_map.values()))}
        for file, handle in self._handles.items():
            listed = {n for n, f in self.weight_map.items() if f == file}
            absent = sorted(listed - set(handle.keys()))
            if absent:
                raise HFCheckpointError(f"{self.hf_dir / file}: index lists tensors the file lacks: {absent[:5]}")

    def names(self) -> List[str]:
        return sorted(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        return self.weight_map[name], self._handles[self.weight_map[name]]

    def shape(self, name: str) -> Tuple[int, ...]:
        """Shape from the header only (no data read)."""
        return tuple(self._handle(name)[1].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._handle(name)[1].get_slice(name).get_dtype()]

    def get(self, name: str, dtype: Optional[torch.dtype] = None) -> Tensor:
        """One tensor, copied out of the mapping (optionally cast)."""
        file, handle = self._handle(name)
        try:
            t = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(f"{self.hf_dir / file}: cannot read tensor {name!r}: {e}") from None
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def check_shapes(self, expected: Mapping[str, Tuple[int, ...]]) -> None:
        """Every expected tensor exists with the expected shape; raise naming file and tensor."""
        for name, shape in expected.items():
            file, _ = self._handle(name)
            found = self.shape(name)
            if found != tuple(shape):
                raise HFCheckpointError(
                    f"{self.hf_dir / file}: tensor {name!r} has shape {list(found)} but the config implies "
                    f"{list(shape)}"
                )

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_output_dir(out: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out`` on success and vanishes on error.

    ``out`` must not exist (or be an empty folder): a conversion never overwrites a model.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output already exists and is not an empty folder")
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


class _ShardWriter:
    """One safetensors file written tensor by tensor, so only the tensor being added is in memory.

    The format (safetensors' documented layout): an 8-byte little-endian header length, a JSON
    header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``), padded with spaces
    to a multiple of 8, then the raw little-endian data. The header needs every tensor's offsets, so
    the data goes to ``<path>.data`` as tensors arrive and :meth:`close` writes the header and then
    copies the data after it (the library's ``save_file`` would need the whole shard in memory).
    """

    def __init__(self, path: Path):
        if sys.byteorder != "little":  # safetensors data is little-endian; we write raw memory
            raise RuntimeError("writing safetensors needs a little-endian machine")
        self.path = path
        self._data_path = path.with_name(path.name + ".data")
        self._data_path.write_bytes(b"")
        self._header: Dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: Tensor) -> None:
        flat = t.detach().cpu().contiguous().reshape(-1)
        n = flat.numel() * flat.element_size()
        if n:  # appended per tensor: no handle stays open when the producer raises
            with open(self._data_path, "ab") as data:
                data.write(flat.view(torch.uint8).numpy().data)
        self._header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + n]}  # fmt: skip
        self.size += n

    def names(self) -> List[str]:
        return list(self._header)

    def close(self) -> None:
        # format=pt is what transformers expects in the safetensors metadata.
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 1024**2)
        os.remove(self._data_path)


def write_safetensors_shards(
    folder: Path, named_tensors: Iterable[Tuple[str, Tensor]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Dict[str, str]:
    """Stream tensors into ``model-XXXXX-of-YYYYY.safetensors`` (or one ``model.safetensors``).

    A shard is closed before it would exceed ``max_shard_bytes`` (a larger tensor gets a shard of
    its own). Each tensor is written when it arrives and then dropped, so the writer holds one
    tensor at a time whatever the shard size. Writes the index when there are several shards.
    Returns the weight map (tensor name -> file name). Duplicate names raise.
    """
    shards: List[_ShardWriter] = []
    seen: set = set()
    total = 0
    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        size = t.numel() * t.element_size()
        if not shards or (shards[-1].size and shards[-1].size + size > max_shard_bytes):
            if shards:
                shards[-1].close()
            shards.append(_ShardWriter(folder / f"shard-{len(shards):05d}.partial"))
        shards[-1].add(name, t)
        total += size
        del t  # not held while the producer makes the next tensor
    if not shards:
        shards.append(_ShardWriter(folder / "shard-00000.partial"))
    shards[-1].close()
    n = len(shards)
    weight_map: Dict[str, str] = {}
    for k, shard in enumerate(shards):
        final = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(shard.path, folder / final)
        weight_map.update(dict.fromkeys(shard.names(), final))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_hf_folder(
    out: Union[str, Path],
    named_tensors: Iterable[Tuple[str, Tensor]],
    *,
    config: dict,
    extra_json: Optional[Mapping[str, dict]] = None,
    copy_files: Iterable[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Dict[str, str]:
    """Write an HF model folder atomically: config.json, extra JSON files, copied files, shards.

    ``named_tensors`` is consumed lazily (see :func:`write_safetensors_shards`).
    """
    with atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, content in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
        for src in copy_files:
            shutil.copy2(src, tmp / Path(src).name)
        return write_safetensors_shards(tmp, named_tensors, max_shard_bytes)

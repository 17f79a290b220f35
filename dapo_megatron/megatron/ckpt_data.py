"""What a checkpoint stores besides megatron's files, as data only: JSON and safetensors.

Loading a checkpoint must never run code, so nothing here is pickled:

- ``extra_state`` (sampler position, dynamic-sampling state) becomes JSON through :func:`to_json`.
  JSON has no tuples, no non-string keys and no classes, so the codec tags the few kinds it must
  keep exact -- tuples and the contract dataclasses :class:`~dapo_megatron.types.Sample` and
  :class:`~dapo_megatron.types.Group` -- and refuses everything else, naming the path of the value.
  Decoding builds only those two dataclasses, chosen from a fixed table, never by a name read
  from the file being trusted to import something.
- RNG states go to one safetensors file per rank (:func:`write_rng_file`): the byte-tensor states
  of torch, CUDA and megatron's tracker as tensors; python ``random``'s 625 words and numpy's 624
  as int64 tensors; the few scalars (versions, positions, cached gaussians) as JSON in the file's
  metadata. Floats go through JSON's ``repr``, which round-trips every finite double exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict

import torch

_TUPLE = "__tuple__"
_TYPE = "__type__"


def _contract_types() -> Dict[str, type]:
    from dapo_megatron.types import Group, Sample

    return {"Sample": Sample, "Group": Group}


def to_json(value: Any, where: str = "extra_state") -> Any:
    """``value`` as JSON-ready data; raises ``TypeError`` naming ``where`` for anything else.

    Invariant: ``from_json(json.loads(json.dumps(to_json(v)))) == v`` for every accepted ``v``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN/inf: keep them exact as text
            return {_TYPE: "float", "value": repr(value)}
        return value
    if isinstance(value, list):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad or _TUPLE in value or _TYPE in value:
            raise TypeError(f"{where}: dict keys must be strings other than {_TUPLE!r}/{_TYPE!r}, got {bad[:3]}")
        return {k: to_json(v, f"{where}.{k}") for k, v in value.items()}
    name = type(value).__name__
    if dataclasses.is_dataclass(value) and _contract_types().get(name) is type(value):
        fields = {f.name: to_json(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {_TYPE: name, "fields": fields}
    raise TypeError(f"{where}: a checkpoint stores JSON data, Sample and Group only; got {type(value).__qualname__}")


def from_json(data: Any, where: str = "extra_state") -> Any:
    """Inverse of :func:`to_json`; raises ``ValueError`` naming ``where`` on a tag it does not know."""
    if isinstance(data, list):
        return [from_json(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        return data
    if _TUPLE in data:
        return tuple(from_json(v, f"{where}[{i}]") for i, v in enumerate(data[_TUPLE]))
    if _TYPE not in data:
        return {k: from_json(v, f"{where}.{k}") for k, v in data.items()}
    tag = data[_TYPE]
    if tag == "float":
        return float(data["value"])
    cls = _contract_types().get(tag)
    if cls is None:
        raise ValueError(f"{where}: unknown type tag {tag!r} (expected 'Sample', 'Group' or 'float')")
    return cls(**{k: from_json(v, f"{where}.{k}") for k, v in data["fields"].items()})


# ----------------------------------------------------------------------------- RNG states
def write_rng_file(path: str, state: Dict[str, Any]) -> None:
    """Write an RNG ``state`` (keys python, numpy, torch, cuda, tracker) to a safetensors file.

    ``state["numpy"]`` may be None (numpy absent); ``state["cuda"]`` is None or a list of byte
    tensors; ``state["tracker"]`` maps megatron's tracker names to byte tensors.
    """
    from safetensors.torch import save_file

    version, words, gauss_next = state["python"]
    tensors = {"torch": state["torch"], "python.words": torch.tensor(words, dtype=torch.int64)}
    info: Dict[str, Any] = {"python": {"version": version, "gauss_next": gauss_next}, "numpy": None}
    if state["numpy"] is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        tensors["numpy.keys"] = torch.from_numpy(keys.astype("int64"))
        info["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    cuda = state["cuda"] or []
    info["cuda_devices"] = len(cuda) if state["cuda"] is not None else None
    tensors.update({f"cuda.{i}": t for i, t in enumerate(cuda)})
    info["tracker"] = sorted(state["tracker"])
    tensors.update({f"tracker.{name}": t for name, t in state["tracker"].items()})
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    save_file(tensors, path, metadata={"rng": json.dumps(info)})


def read_rng_file(path: str) -> Dict[str, Any]:
    """The state :func:`write_rng_file` wrote (numpy's as the tuple ``np.random.set_state`` takes)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["rng"])
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    py = info["python"]
    state: Dict[str, Any] = {
        "python": (py["version"], tuple(int(x) for x in t["python.words"].tolist()), py["gauss_next"]),
        "numpy": None,
        "torch": t["torch"],
        "cuda": None if info["cuda_devices"] is None else [t[f"cuda.{i}"] for i in range(info["cuda_devices"])],
        "tracker": {name: t[f"tracker.{name}"] for name in info["tracker"]},
    }
    if info["numpy"] is not None:
        n = info["numpy"]
        keys = t["numpy.keys"].numpy().astype("uint32")
        state["numpy"] = (n["kind"], keys, n["pos"], n["has_gauss"], n["cached"])
    return state

"""Building a :class:`~dapo_megatron.config.Config` from YAML and dotted overrides, and writing it back.

    cfg = load_config("examples/demo.yaml", ["algo.clip_ratio_high=0.3", "rollout.temperature=0.8"])

String values may name environment variables as ``${NAME}`` (cluster recipes point at
``${MODELS}``, ``${DATA}``); an unset variable is an :class:`UnsetEnvError` naming the variable, the
key, the file (or override) and the ``export`` that fixes it.

Every key is checked against the dataclass tree: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted key and the expected type. Range checks then run in each
section's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import typing
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from dapo_megatron.config import Config, ConfigError


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (YAML; None for all defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except (IsADirectoryError, PermissionError) as e:
            raise ConfigError(f"config file {path!r}: cannot be read ({e.strerror}); expected a YAML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path!r}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(raw).__name__}")
    overrides = list(overrides)
    for item in overrides:
        _apply_override(raw, item)
    try:
        return from_dict(Config, raw)
    except UnsetEnvError as e:  # name where the ${NAME} was written: the file or an override
        given = [o for o in overrides if o.partition("=")[0].strip() == e.key]
        where = f"the override {given[-1]!r}" if given else (path or "the config")
        raise UnsetEnvError(e.name, e.key, where) from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem}); quote it") from None


def from_dict(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types recursively."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key in {where}; known keys are {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_expand_env(v, key) if isinstance(v, str) else v for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string; it is a number to a user
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML .inf/.nan, "inf", 1e999: they pass every "> 0" range check
            raise ConfigError(f"{key}: expected a finite number, got {float(value)!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return _expand_env(value, key)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in the tree, not user input


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# What each variable of the shipped configs should hold, for the remedy an unset one's error gives.
# The cluster recipes (examples/dapo_qwen2.5_*.yaml) read MODELS, CKPT and DATA; no sbatch script sets
# them (they are site paths): sbatch passes the submitting shell's environment to every node.
ENV_HINTS = {
    "MODELS": "<folder holding the HF model folders, e.g. its Qwen2.5-7B/>",
    "CKPT": "<folder of the megatron checkpoints tools/convert_hf_to_megatron.py --out writes>",
    "DATA": "<folder of the parquet files tools/prepare_dapo_data.py writes>",
    "DEMO_ASSETS": "<folder written by `dapo-megatron demo --assets-only DIR`>",
}
CLUSTER_VARS = ("MODELS", "CKPT", "DATA")


class UnsetEnvError(ConfigError):
    """A config value names ``${NAME}`` and NAME is not set. The message names the variable, the
    dotted key, where it was written (``source``: the config file or an override) and the remedy."""

    def __init__(self, name: str, key: str, source: Optional[str] = None) -> None:
        self.name, self.key, self.source = name, key, source
        where = f" in {source}" if source else ""
        remedy = f"export {name}={ENV_HINTS.get(name, '<value>')} before running"
        if name in CLUSTER_VARS:
            remedy += (
                f" (no slurm/*.sbatch sets {name}: export it in the shell that calls sbatch, which hands its "
                "environment to every node; slurm/common.sh lists MODELS, CKPT and DATA)"
            )
        super().__init__(f"{key}{where} uses ${{{name}}}, which is not set: {remedy}")


def _expand_env(text: str, key: str) -> str:
    """Replace each ``${NAME}`` with the environment's value; an unset NAME is :class:`UnsetEnvError`."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise UnsetEnvError(name, key)
        return os.environ[name]

    return _ENV_REF.sub(sub, text)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts and lists (tuples become lists), for YAML and loggers."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: str) -> None:
    """Write the resolved config to ``path`` atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

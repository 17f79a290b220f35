"""Metric sinks: one JSON line per step on disk, a compact console line, and optionally W&B.

    logger = MetricsLogger(paths.root, wandb_cfg=wandb_settings(cfg.run, to_dict(cfg)))
    logger.log(step, {REWARD_ACC: 0.41, TIME_TRAIN: 12.3})
    logger.close()

Only trainer rank 0 should build a logger: several writers on one ``metrics.jsonl`` would interleave.

``metrics.jsonl`` is the run's durable record. Each line is ``{"step": N, "wall_time": unix_s,
<key>: <number>, ...}``, written, flushed and fsynced before ``log`` returns, so a SIGKILL loses at
most the line being written. A non-finite value (NaN, ±inf) is not valid JSON: it is written as
``null`` and its key is listed under ``"nonfinite"`` in the same line, so "diverged" and "not
measured" stay distinguishable.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from dapo_megatron.errors import InputError
from dapo_megatron.observability.metric_names import CONSOLE_KEYS

METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("step", "wall_time", "nonfinite")
WANDB_KEYS = ("project", "name", "mode", "config", "id", "group", "tags", "dir", "resume")
WANDB_MODES = ("online", "offline", "disabled")


class MetricsLogger:
    """Write per-step metrics to ``run_dir/metrics.jsonl``, the console and (optionally) W&B.

    Args:
        run_dir: existing or new folder; ``metrics.jsonl`` is appended to (resume keeps history).
        console: print one rich line per step.
        jsonl: write ``metrics.jsonl``.
        wandb_cfg: None (no W&B) or a dict with keys from ``WANDB_KEYS``: ``project``, ``name``,
            ``mode`` (online/offline/disabled; default offline), ``config`` (a plain dict), ``id``,
            ``group``, ``tags``, ``dir`` (default ``run_dir``; offline runs land there, no network
            needed) and ``resume``.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        console: bool = True,
        jsonl: bool = True,
        wandb_cfg: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = _open_for_append(self.path) if jsonl else None
        self._console = _make_console() if console else None
        self._wandb = _init_wandb(wandb_cfg, run_dir) if wandb_cfg is not None else None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` of ``step`` in every enabled sink. Values must be numbers (or 0-d tensors)."""
        values = {key: _as_number(key, value) for key, value in metrics.items()}
        bad = [key for key in values if key in RESERVED_KEYS]
        if bad:
            raise ValueError(f"metric keys {bad} are reserved by metrics.jsonl; rename them")
        if self._file is not None:
            _write_line(self._file, _json_record(step, values))
        if self._console is not None:
            self._console.print(format_console_line(step, values), highlight=False, soft_wrap=True)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def close(self) -> None:
        """Close the file and finish the W&B run. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wandb_settings(run_cfg: Any, config: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The ``wandb_cfg`` for :class:`MetricsLogger` from a ``RunConfig``; None when W&B is off."""
    if not run_cfg.wandb:
        return None
    return {"project": run_cfg.wandb_project, "name": run_cfg.name, "mode": run_cfg.wandb_mode, "config": config}


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (or of ``<run_dir>/metrics.jsonl``), in file order.

    A torn last line (the process died mid-write) is ignored. A malformed line elsewhere means the
    file is not ours or was edited: that raises :class:`InputError` naming the line, as does a
    missing or unreadable file.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{path}: not found; expected a run folder holding {METRICS_FILE}, or the file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); expected {METRICS_FILE} lines") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # no newline after it: the write was cut short
                break
            raise InputError(f"{path}:{lineno}: not a JSON line: {line[:80]!r}") from None
    return records


def format_console_line(step: int, values: Mapping[str, float]) -> str:
    """``step 12 | reward/acc 0.4100 | ...``: the preferred keys when present, else the first eight."""
    keys = [k for k in CONSOLE_KEYS if k in values] or list(values)[:8]
    parts = [f"step {step}"] + [f"{k} {_short(values[k])}" for k in keys]
    return " | ".join(parts)


def _short(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _as_number(key: str, value: Any) -> float:
    if hasattr(value, "item"):  # 0-d torch tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from None


def _json_record(step: int, values: Mapping[str, float]) -> str:
    record: Dict[str, Any] = {"step": int(step), "wall_time": round(time.time(), 3)}
    nonfinite = []
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite.append(key)
            value = None
        record[key] = value
    if nonfinite:
        record["nonfinite"] = nonfinite
    return json.dumps(record, allow_nan=False)


def _write_line(f: Any, line: str) -> None:
    # One write call per line, then flush and fsync: after this returns the line survives SIGKILL.
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def _open_for_append(path: str) -> Any:
    """Open ``path`` for appending, first cutting off a torn last line left by a killed writer."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def _make_console() -> Any:
    from rich.console import Console

    return Console()


def _init_wandb(wandb_cfg: Dict[str, Any], run_dir: str) -> Any:
    """Start a W&B run (imported here: most runs never need it). Returns the run object."""
    unknown = sorted(set(wandb_cfg) - set(WANDB_KEYS))
    if unknown:
        raise ValueError(f"wandb_cfg: unknown keys {unknown}; allowed keys are {', '.join(WANDB_KEYS)}")
    kwargs = {k: v for k, v in wandb_cfg.items() if v is not None}
    kwargs.setdefault("mode", "offline")
    kwargs.setdefault("dir", run_dir)
    if kwargs["mode"] not in WANDB_MODES:
        raise ValueError(f"wandb_cfg['mode']: got {kwargs['mode']!r}, allowed values are {WANDB_MODES}")
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "W&B logging is enabled (run.wandb=true) but the 'wandb' package is not installed; "
            "install it (pip install wandb) or set run.wandb=false"
        ) from None
    os.makedirs(kwargs["dir"], exist_ok=True)
    return wandb.init(**kwargs)

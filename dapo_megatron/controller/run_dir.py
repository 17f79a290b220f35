"""The run directory: one folder per run holding everything needed to inspect or resume it.

    <run.dir>/
        .dapo_megatron_run     marker: this folder belongs to a dapo_megatron run
        run.lock               held (flock) by the one process writing this run; "<pid> <host>"
        config.yaml            the resolved config of the latest launch
        metrics.jsonl          one JSON line per step (observability.sinks)
        checkpoints/           dist checkpoints
        logs/                  per-rank and engine logs; earlier configs of resumed runs
        rollouts/              step_N.jsonl dumps (run.dump_rollouts)

Only trainer rank 0 calls :func:`lock_run_dir` and :func:`prepare_run_dir`; the other ranks wait
at a barrier and then use the same paths.

One writer: the process that owns the folder (trainer rank 0, or ``demo``) holds an exclusive
``flock`` on ``run.lock`` for its whole life, taken before anything else is written. The kernel drops
it when the process dies however it dies, so there is never a stale lock to remove by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

MARKER = ".dapo_megatron_run"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
# What the sbatch scripts put into a fresh run folder before the trainer starts (slurm/common.sh
# makes logs/, `dapo-megatron plan --json` writes placement.json and the engines' key): such a
# folder is still "new". (The key file's name is sglang_server.API_KEY_FILE; not imported, so this
# module stays free of the rollout layer.)
LAUNCHER_ENTRIES = {"logs", "placement.json", "engine_api_key"}
# Entries that still leave a folder "new": the launcher's, and the lock, which is taken first.
_FRESH_ENTRIES = LAUNCHER_ENTRIES | {LOCK_FILE}


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked. The message says why and what to change."""


@dataclass(frozen=True)
class RunPaths:
    """Absolute paths inside one run directory."""

    root: str
    config_path: str
    metrics_path: str
    checkpoints_dir: str
    logs_dir: str
    rollouts_dir: str

    @classmethod
    def under(cls, root: str) -> RunPaths:
        """The layout below ``root`` (no file system access)."""
        root = os.path.abspath(root)
        return cls(
            root=root,
            config_path=os.path.join(root, CONFIG_FILE),
            metrics_path=os.path.join(root, METRICS_FILE),
            checkpoints_dir=os.path.join(root, "checkpoints"),
            logs_dir=os.path.join(root, "logs"),
            rollouts_dir=os.path.join(root, "rollouts"),
        )


def prepare_run_dir(run_dir: str, *, resume: bool, config: Optional[Any] = None) -> RunPaths:
    """Create (or reopen) the run folder ``run_dir`` and write the resolved ``config`` into it.

    Args:
        run_dir: ``cfg.run.dir``.
        resume: ``cfg.run.resume``. With False, a folder that already holds a run's progress
            (metrics or checkpoints) is refused instead of being mixed into.
        config: the resolved :class:`~dapo_megatron.config.Config`; written to ``config.yaml``.
            When resuming with a config that differs from the stored one, the stored one is kept
            as ``logs/config.<unix time>.yaml`` first.

    Raises:
        RunDirError: ``run_dir`` is a file, a non-empty folder that is not a dapo_megatron run,
            or a run with progress while ``resume`` is False.
    """
    paths = RunPaths.under(run_dir)
    _check_reusable(paths, resume)
    for folder in (paths.root, paths.checkpoints_dir, paths.logs_dir, paths.rollouts_dir):
        os.makedirs(folder, exist_ok=True)
    marker = os.path.join(paths.root, MARKER)
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            json.dump({"created": time.time(), "format": 1}, f)
    if config is not None:
        _write_config(config, paths)
    return paths


class RunLock:
    """The exclusive ``flock`` on ``<run.dir>/run.lock`` held by the run's owning process.

    Invariants: while this object is held (not released) no other process can lock the same folder;
    the lock belongs to this process only (children it forks close their copy at once, so a
    helper process that outlives the trainer does not keep the folder locked).
    """

    def __init__(self, root: str, fd: int):
        self.root, self._fd = root, fd
        # After os.fork the child shares the open file description, and a flock lives as long as
        # any copy of it is open: close the child's copy so the lock dies with this process.
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock). Safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_run_dir(run_dir: str) -> RunLock:
    """Take the run folder's single-writer lock before anything else writes into it.

    Creates ``run_dir`` when missing (never inside a non-empty folder that is not a run), locks
    ``run.lock`` without waiting and writes ``"<pid> <host>"`` into it for the message others get.

    Raises:
        RunDirError: another live process holds the lock (the message names the folder and that
            process's pid and host), or ``run_dir`` is a file or a foreign non-empty folder.
    """
    root = os.path.abspath(run_dir)
    _check_reusable(RunPaths.under(root), resume=True)  # file / foreign folder: refuse before writing
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").split()
        os.close(fd)
        pid, host = (holder + ["?", "?"])[:2]
        raise RunDirError(
            f"run.dir {root!r} is in use by another run (pid {pid} on host {host}, holding {LOCK_FILE}); "
            "one run writes a folder at a time: wait for it to end, stop it, or choose another run.dir"
        ) from None
    # The holder's identity, rewritten in place: the lock is on this inode, so no tmp + rename.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return RunLock(root, fd)


def is_run_dir(path: str) -> bool:
    """True when ``path`` holds the marker of a dapo_megatron run."""
    return os.path.isfile(os.path.join(path, MARKER))


def has_progress(paths: RunPaths) -> bool:
    """True when the run has logged a step or saved a checkpoint."""
    metrics = os.path.isfile(paths.metrics_path) and os.path.getsize(paths.metrics_path) > 0
    checkpoints = os.path.isdir(paths.checkpoints_dir) and bool(os.listdir(paths.checkpoints_dir))
    return metrics or checkpoints


def _check_reusable(paths: RunPaths, resume: bool) -> None:
    root = paths.root
    if os.path.exists(root) and not os.path.isdir(root):
        raise RunDirError(f"run.dir {root!r} is a file, not a folder; choose another run.dir")
    if not os.path.isdir(root) or set(os.listdir(root)) <= _FRESH_ENTRIES:
        return
    if not is_run_dir(root):
        raise RunDirError(
            f"run.dir {root!r} is not empty and is not a dapo_megatron run (no {MARKER} marker); "
            "refusing to write into it. Choose a new or empty run.dir."
        )
    if not resume and has_progress(paths):
        raise RunDirError(
            f"run.dir {root!r} already holds a run with metrics or checkpoints and run.resume=false; "
            "set run.resume=true to continue it, or choose another run.dir for a fresh run."
        )


def _write_config(config: Any, paths: RunPaths) -> None:
    from dapo_megatron.config_io import dump_config, to_yaml

    if os.path.isfile(paths.config_path):
        with open(paths.config_path) as f:
            old = f.read()
        if old != to_yaml(config):
            keep = os.path.join(paths.logs_dir, f"config.{int(time.time())}.yaml")
            with open(keep, "w") as f:
                f.write(old)
    dump_config(config, paths.config_path)

#!/usr/bin/env python
"""Where a training run's memory goes: per process, per kind of mapping, at the run's peak.

    OMP_NUM_THREADS=1 python benchmarks/memory_breakdown.py --out runs/vs_trl [--steps 30] [--side both]

Runs this project (``dapo-megatron train``, the command of ``benchmarks/vs_trl.py``) and/or TRL (from
``.venv-trl``) from the vs_trl warm-up in ``--out`` (prepared there once), one after the other. Every
``--interval`` seconds it reads ``/proc/<pid>/smaps`` of every process of the run's tree; at the sample
with the largest summed PSS it reports each process's PSS by kind of mapping:

* ``anonymous``: the heap (tensors, Python objects, allocator caches) and thread stacks;
* ``torch libs``: the shared objects under ``torch/lib`` (code and data of libtorch);
* ``other libs``: every other shared object (Python extensions, numpy, pyarrow, ...);
* ``shared memory``: ``/dev/shm`` files and memfds (tensors shared with a worker process);
* ``other files``: the interpreter and other mapped files.

PSS splits a shared page among the processes that map it, so the rows add up to the tree's total.
For this project's run it also places each step's peak in the step (from ``metrics.jsonl``): the
floor between steps, the peak within them, and how many steps peak in the train phase.
Also printed: the state this project cannot do without, from the model and the config: parameters,
gradients and Adam's two moments in the trainer, the engine's copy of the weights and its KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import vs_trl  # noqa: E402  (the shared warm-up and both sides' commands)

KINDS = ("anonymous", "torch libs", "other libs", "shared memory", "other files")


def mapping_kind(path: str) -> str:
    """The kind (one of :data:`KINDS`) of a mapping of ``/proc/<pid>/smaps`` named ``path``."""
    if not path or path.startswith("[") or path.startswith("/SYSV"):
        return "anonymous"
    if path.startswith("/dev/shm/") or path.startswith("/memfd:"):
        return "shared memory"
    if "/torch/lib/" in path:
        return "torch libs"
    if ".so" in os.path.basename(path):
        return "other libs"
    return "other files"


def process_pss(pid: int) -> Counter:
    """PSS bytes of process ``pid`` by kind (empty when it exited)."""
    out: Counter = Counter()
    kind = "anonymous"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5:  # a mapping's header: address perms offset dev inode [path]
                    kind = mapping_kind(head[5].strip() if len(head) > 5 else "")
                elif head[0] == "Pss:":
                    out[kind] += int(head[1]) * 1024
    except OSError:
        return Counter()
    return out


def tree(pid: int) -> List[Tuple[int, str]]:
    """``(pid, name)`` of ``pid`` and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    named = []
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        named.append((p.pid, " ".join(os.path.basename(c) for c in cmd[:4])[:60]))
    return named


class PeakSampler:
    """Samples the tree of ``pid`` in a thread; ``peak`` is ``{(pid, name): Counter}`` at the largest total."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.peak: Dict[Tuple[int, str], Counter] = {}
        self.peak_total = 0
        self.samples: List[Tuple[float, int]] = []  # (time.time(), the tree's PSS in bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            snap = {(p, name): process_pss(p) for p, name in tree(self.pid)}
            total = sum(sum(c.values()) for c in snap.values())
            self.samples.append((time.time(), total))
            if total > self.peak_total:
                self.peak, self.peak_total = snap, total
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_sampled(cmd: List[str], log_path: str, interval: float) -> PeakSampler:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=vs_trl.thread_env(), stdout=log, stderr=subprocess.STDOUT, cwd=vs_trl.REPO)
        with PeakSampler(proc.pid, interval) as sampler:
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited {rc}; see {log_path}")
    return sampler


def required_state(paths: Dict[str, str], config: str, overrides: List[str]) -> Dict[str, int]:
    """Bytes of the state a run must hold: the weights (fp32 safetensors of the warm-up) four times in the
    trainer (parameters, gradients, Adam's two moments), once in the engine, and the engine's KV cache."""
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.engines import embedded_shape
    from dapo_megatron.observability.memory_plan import kv_bytes_per_token, shape_from_hf_config

    weights = sum(os.path.getsize(os.path.join(paths["model"], f)) for f in os.listdir(paths["model"])
                  if f.endswith(".safetensors"))  # fmt: skip
    with open(os.path.join(paths["model"], "config.json")) as f:
        hf = json.load(f)
    shape = embedded_shape(load_config(config, overrides))
    per_token = kv_bytes_per_token(shape_from_hf_config(hf), engine_tp=1, kv_dtype="fp32")
    cache = shape["max_batch_rows"] * shape["max_seq_len"] * per_token
    return {"trainer: params + grads + Adam": 4 * weights, "engine: weights": weights, "engine: KV cache": cache}


def peak_phases(samples: List[Tuple[float, int]], steps: List[Dict[str, float]]) -> Dict[str, float]:
    """Where in its step each training step peaks.

    ``samples``: ``(wall time, PSS bytes)`` in time order; ``steps``: ``metrics.jsonl`` records, each
    logged at its step's end (``wall_time``) with its phases' seconds. A step spans from the record
    before it to its own; the loop's order within it is generate, old log-probs, train, sync, the
    evaluation (on some steps), the heap trim, so its train phase is the ``time/train_s`` seconds that
    end ``time/sync_s + time/eval_s + time/heap_trim_s`` before the step's end. Returns MiB: the
    median and the highest of the steps' lowest sample (``floor_*``), the median and highest of their
    peaks (``peak_*``), and ``steps`` / ``peaks_in_train``: the steps with samples, and how many of
    them peak in the train phase.
    """
    floors, peaks, in_train = [], [], 0
    for before, step in zip(steps, steps[1:]):
        inside = [(t, pss) for t, pss in samples if before["wall_time"] < t <= step["wall_time"]]
        if not inside:
            continue
        t_peak, peak = max(inside, key=lambda s: s[1])
        after = sum(step.get(k, 0.0) for k in ("time/sync_s", "time/eval_s", "time/heap_trim_s"))
        in_train += after <= step["wall_time"] - t_peak <= after + step.get("time/train_s", 0.0)
        floors.append(min(pss for _, pss in inside))
        peaks.append(peak)
    mib = 2**20
    if not peaks:
        return {"steps": 0, "peaks_in_train": 0}
    return {"floor_median": statistics.median(floors) / mib, "floor_max": max(floors) / mib,
            "peak_median": statistics.median(peaks) / mib, "peak_max": max(peaks) / mib,
            "steps": len(peaks), "peaks_in_train": in_train}  # fmt: skip


def table(name: str, sampler: PeakSampler) -> str:
    mib = 2**20
    rows = [f"### {name}: peak PSS {sampler.peak_total / mib:.0f} MiB (whole tree)", "",
            "| process | " + " | ".join(KINDS) + " | total |", "|---" * (len(KINDS) + 2) + "|"]  # fmt: skip
    for (pid, cmd), kinds in sorted(sampler.peak.items(), key=lambda kv: -sum(kv[1].values())):
        cells = " | ".join(f"{kinds[k] / mib:.0f}" for k in KINDS)
        rows.append(f"| {pid} `{cmd}` | {cells} | {sum(kinds.values()) / mib:.0f} |")
    return "\n".join(rows) + "\n"


def phase_line(sampler: PeakSampler, metrics: str) -> str:
    steps = [r for r in vs_trl.read_lines(metrics) if "wall_time" in r]
    ph = peak_phases(sampler.samples, steps)
    if not ph["steps"]:
        return "(no step had a sample: lower --interval)\n"
    return (
        f"Per step, MiB: floor median {ph['floor_median']:.0f} (max {ph['floor_max']:.0f}), peak median "
        f"{ph['peak_median']:.0f} (max {ph['peak_max']:.0f}); {ph['peaks_in_train']} of {ph['steps']} "
        "steps peak in their train phase.\n"
    )


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(vs_trl.REPO, "runs", "vs_trl"), help="the vs_trl folder (warm-up)")
    p.add_argument("--config", default=vs_trl.DEMO_CONFIG)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--side", choices=("ours", "trl", "both"), default="both")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--trl-python", default=os.path.join(vs_trl.REPO, ".venv-trl", "bin", "python"))
    p.add_argument("overrides", nargs="*", help="dotted config overrides (as for vs_trl.py)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    paths = vs_trl.prepare(args.out, args.overrides, args.config)
    run_args = argparse.Namespace(**vars(args), threshold=0.9, checkpoints=[])
    out = [f"memory breakdown, MiB of PSS at each run's peak, {args.steps} steps; machine {vs_trl.machine()}", ""]
    if args.side in ("ours", "both"):
        run_dir = os.path.join(args.out, "memory_ours")
        cmd = vs_trl.ours_command(paths, run_dir, run_args)
        sampler = run_sampled(cmd, os.path.join(args.out, "memory_ours.log"), args.interval)
        out.append(table("this project", sampler))
        out.append(phase_line(sampler, os.path.join(run_dir, "metrics.jsonl")))
        state = required_state(paths, args.config, args.overrides)
        out += [f"- {k}: {v / 2**20:.1f} MiB" for k, v in state.items()] + [""]
    if args.side in ("trl", "both"):
        cmd = vs_trl.trl_command(paths, os.path.join(args.out, "memory_trl", "metrics.jsonl"), run_args)
        os.makedirs(os.path.join(args.out, "memory_trl"), exist_ok=True)
        out.append(table("TRL", run_sampled(cmd, os.path.join(args.out, "memory_trl.log"), args.interval)))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

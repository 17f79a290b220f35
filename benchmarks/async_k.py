#!/usr/bin/env python
"""Asynchronous DAPO on the demo task: K = rollout.max_staleness 0 (synchronous) vs 1 vs 2 (CPU).

    python benchmarks/async_k.py --out runs/async_k --ks 0 1 2 --seeds 0 [--steps 150 --eval-every 25]

Every run starts from the same supervised warm-up checkpoint (made once, as ``ablation.py`` does) and
runs the embedded engine in its own process (``rollout.embedded_process=true``), so generation and
training really run at once for K >= 1 (``rollout.async_interleave=overlap``, the default). K >= 1
turns the off-policy correction on (``algo.tis.enable=true``), as the config requires. Seeds change
the rollout sampling. Printed (and written to ``OUT/async_k.md`` / ``.json``), per K over the seeds:

* held-out accuracy at the end, and the wall time (from the step-0 evaluation) of the first evaluated
  step reaching ``--threshold``; the training wall time in all;
* overlap: per step, generation ran next to the actor for ``min(async/head_start_s, logprob + train)``
  seconds (the head start runs from the moment the batch is taken until the weight sync). Reported as
  a fraction of the step wall time, and as the share of the actor's compute window (log-probs +
  train) in which the engine was busy instead of idle (``idle removed``: 0 at K = 0 by definition).

Timings depend on the machine's load: run it on an idle machine, one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

# The warm-up runs in this process: one thread, as the README demo runs it (tools/run_demo.sh), so it
# reaches the same weights (the float reductions, and with them the warm-up, depend on the thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablation import BASE, _fmt, prepare, spread_table  # noqa: E402  (a sibling script, not a package)


def run_one(k: int, seed: int, paths: Dict[str, str], args: argparse.Namespace) -> str:
    """Train the demo at staleness ``k`` from the shared warm-up; returns the run folder (reused when done)."""
    run_dir = os.path.join(args.out, f"k{k}_seed{seed}")
    if os.path.isfile(os.path.join(run_dir, "done")):
        return run_dir
    overrides = [
        f"model.hf_path={paths['model']}", f"model.load={paths['sft']}", f"data.train_files=[{paths['train']}]",
        f"data.eval_files=[{paths['eval']}]", "data.template=none", f"run.dir={run_dir}", f"rollout.seed={seed}",
        f"train.total_steps={args.steps}", f"run.eval_every={args.eval_every}", f"run.save_every={args.steps}",
        "rollout.embedded_process=true", f"rollout.max_staleness={k}", f"algo.tis.enable={str(k > 0).lower()}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(27000 + 31 * seed + 7 * k))
    cmd = [sys.executable, "-m", "dapo_megatron", "train", "--config", BASE, *overrides]
    with open(run_dir + ".log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    open(os.path.join(run_dir, "done"), "w").close()
    return run_dir


def summarize(run_dir: str, threshold: float) -> Dict[str, Optional[float]]:
    """Accuracy, time to ``threshold`` and overlap of one run (see the module docstring)."""
    from dapo_megatron.observability.sinks import read_metrics

    records = read_metrics(run_dir)
    t0 = records[0]["wall_time"]  # the step-0 evaluation line: training starts after it
    evals = [(r["wall_time"] - t0, r["eval/acc"]) for r in records if "eval/acc" in r]
    steps = [r for r in records if r["step"] > 0]
    reached = next((t for t, acc in evals if acc >= threshold), None)
    window = [r.get("time/logprob_s", 0.0) + r.get("time/train_s", 0.0) for r in steps]
    overlap = [min(r.get("async/head_start_s", 0.0), w) for r, w in zip(steps, window)]
    wall = steps[-1]["wall_time"] - t0
    return {
        "start_acc": evals[0][1],
        "final_acc": evals[-1][1],
        "seconds_to_threshold": reached,
        "train_wall_s": wall,
        "overlap_frac": sum(overlap) / wall if wall > 0 else 0.0,
        "idle_removed": sum(overlap) / sum(window) if sum(window) > 0 else 0.0,
        "generate_s_per_step": statistics.fmean(r.get("time/generate_s", 0.0) for r in steps),
        "staleness_mean": statistics.fmean(r.get("staleness/mean", 0.0) for r in steps),
    }


def table(results: Dict[int, List[dict]], threshold: float) -> str:
    return spread_table(results, [
        ("K", None),
        ("held-out acc (start → end)", lambda c: f"{_fmt(c['start_acc'], 3)} → {_fmt(c['final_acc'], 3)}"),
        (f"s to acc ≥ {threshold}", lambda c: _fmt(c["seconds_to_threshold"], 0)),
        ("train wall s", lambda c: _fmt(c["train_wall_s"], 0)),
        ("generate s/step", lambda c: _fmt(c["generate_s_per_step"], 2)),
        ("overlap / step", lambda c: _fmt(c["overlap_frac"], 2)),
        ("idle removed", lambda c: _fmt(c["idle_removed"], 2)),
        ("staleness mean", lambda c: _fmt(c["staleness_mean"], 2)),
    ])  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/async_k")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threshold", type=float, default=0.9, help="held-out accuracy that counts as reached")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paths = prepare(args.out, [])  # the demo's own task
    dirs = {(k, s): run_one(k, s, paths, args) for k in args.ks for s in args.seeds}
    results = {k: [summarize(dirs[(k, s)], args.threshold) for s in args.seeds] for k in args.ks}
    text = table(results, args.threshold)
    with open(os.path.join(args.out, "async_k.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "async_k.json"), "w") as f:
        json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

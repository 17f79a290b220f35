"""Charts of one or several runs from their ``metrics.jsonl`` (e.g. DAPO against GRPO).

    plot_run(["runs/dapo", "runs/grpo"], "plots", labels=["DAPO", "GRPO"])

Each chart is one PNG with one panel per metric; every run is one coloured line in each panel.
A metric a run did not log is left out for that run; a panel no run has data for is dropped; a
chart with no panel left is not written. Uses matplotlib's Agg canvas directly (no pyplot, no
display, no global backend switch).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from dapo_megatron.errors import InputError
from dapo_megatron.observability import metric_names as M
from dapo_megatron.observability.sinks import read_metrics

# file stem -> (title, metric keys, one panel each)
CHARTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "reward": ("Reward and accuracy", (M.REWARD_MEAN, M.REWARD_ACC, M.EVAL_ACC)),
    "entropy": ("Policy entropy (nats/token)", (M.ACTOR_ENTROPY,)),
    "response_length": (
        "Response length (tokens)",
        (M.RESPONSE_LEN_MEAN, M.RESPONSE_LEN_MAX, M.RESPONSE_TRUNCATION_RATE),
    ),
    "dynamic_sampling": ("Dynamic sampling", (M.DS_KEPT_RATIO, M.DS_ROUNDS)),
    "clip_fraction": ("Clipped token fraction", (M.ACTOR_CLIP_FRAC_HIGH, M.ACTOR_CLIP_FRAC_LOW)),
    "actor": ("Actor update", (M.ACTOR_APPROX_KL, M.ACTOR_GRAD_NORM)),
    "phase_times": ("Phase wall time (s)", M.TIME_KEYS),
}

Series = Tuple[List[int], List[float]]


def plot_run(run_dirs: Sequence[str], out_dir: str, labels: Optional[Sequence[str]] = None) -> List[str]:
    """Write the charts of ``run_dirs`` into ``out_dir``; return the paths written (possibly none).

    Args:
        run_dirs: run folders (or ``metrics.jsonl`` files) to overlay.
        out_dir: created if missing; ``<chart>.png`` files are overwritten.
        labels: legend names, one per run; defaults to the folder names.
    """
    if not run_dirs:
        raise ValueError("plot_run needs at least one run directory")
    labels = list(labels) if labels is not None else _default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise InputError(f"--labels: got {len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = [(label, load_series(path)) for label, path in zip(labels, run_dirs)]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, (title, keys) in CHARTS.items():
        panels = [key for key in keys if any(key in series for _, series in runs)]
        if panels:
            path = os.path.join(out_dir, f"{stem}.png")
            _draw_chart(path, title, panels, runs)
            written.append(path)
    return written


def load_series(path: str) -> Dict[str, Series]:
    """``{metric: (steps, values)}`` from a run's metrics; the last record of a repeated step wins.

    A step appears twice when a run resumed from a checkpoint older than its last logged step.
    ``null`` (a non-finite value) becomes NaN, which matplotlib draws as a gap.
    """
    by_step: Dict[int, dict] = {}
    for record in read_metrics(path):
        by_step[int(record["step"])] = record
    series: Dict[str, Series] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if "/" not in key:  # step, wall_time, nonfinite
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(math.nan if value is None else float(value))
    return series


def _default_labels(run_dirs: Sequence[str]) -> List[str]:
    names = [os.path.basename(os.path.normpath(p)) for p in run_dirs]
    if len(set(names)) < len(names):  # e.g. a/run and b/run: fall back to the paths as given
        return [os.path.normpath(p) for p in run_dirs]
    return names


def _draw_chart(path: str, title: str, panels: List[str], runs: List[Tuple[str, Dict[str, Series]]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, panels):
        for i, (label, series) in enumerate(runs):
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, color=f"C{i}", label=label, marker="." if len(steps) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)

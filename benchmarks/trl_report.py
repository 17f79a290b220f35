"""The numbers and the table of ``benchmarks/vs_trl.py``, from the two runs' metrics lines (pure, stdlib).

Both runs log one JSON line per step with this project's names (``benchmarks/trl_grpo_run.py`` writes
TRL's that way): ``step``, ``wall_time`` (epoch seconds when the line was written, after the step's
evaluation), the phase seconds ``time/<phase>_s``, and on evaluation steps ``eval/acc``. Step 0 is the
evaluation before the first update. ``t0`` is the epoch second the run's process was started, so
every time below counts start-up (imports, model load, engines) as the user waits for it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

PHASES = ("generate", "logprob", "train")
"""The phases both systems report; the rest of a step (weight sync, reward scoring) is in the wall time."""

# The top-level phases of a step, disjoint: what the wall time between two lines holds besides an eval.
_STEP_PHASES = ("generate", "logprob", "train", "sync", "score", "heap_trim")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _eval_seconds(line: Dict[str, Any], prev: Optional[Dict[str, Any]]) -> float:
    """Seconds the evaluation on ``line`` took: logged as ``time/eval_s``, else the wall time since the
    previous line less the step's phases (NaN for step 0 without ``time/eval_s``: start-up is mixed in)."""
    if "time/eval_s" in line:
        return float(line["time/eval_s"])
    if prev is None:
        return math.nan
    phases = sum(float(line.get(f"time/{p}_s", 0.0)) for p in _STEP_PHASES)
    return float(line["wall_time"]) - float(prev["wall_time"]) - phases


def summarize(
    lines: List[Dict[str, Any]], *, t0: float, threshold: float, checkpoints: Sequence[int]
) -> Dict[str, Any]:
    """One run's figures.

    Returns a dict: ``steps`` (last step logged), ``step_s`` (mean wall seconds of a step without
    evaluation, from consecutive lines), ``<phase>_s`` for each of :data:`PHASES` (mean over steps
    >= 1 that log it; NaN where none does), ``eval_s`` (total evaluation seconds after step 0),
    ``startup_s`` (``t0`` to the step-0 line, which includes the first evaluation), ``total_s``
    (``t0`` to the last line), ``acc`` (``{step: eval/acc}`` for step 0 and each checkpoint evaluated),
    ``acc_first`` / ``acc_last``, ``threshold_s`` and ``threshold_step`` (the first evaluation with
    ``eval/acc >= threshold``; None when never reached).
    """
    lines = sorted(lines, key=lambda r: r["step"])
    if not lines:
        raise ValueError("summarize: no metrics lines (did the run log anything?)")
    by_step = {int(r["step"]): r for r in lines}
    steps = [r for r in lines if r["step"] >= 1]
    walls = [
        float(r["wall_time"]) - float(by_step[r["step"] - 1]["wall_time"])
        for r in steps
        if "eval/acc" not in r and r["step"] - 1 in by_step
    ]
    evals = [r for r in lines if "eval/acc" in r]
    out: Dict[str, Any] = {"steps": int(lines[-1]["step"]), "step_s": _mean(walls)}
    for phase in PHASES:
        out[f"{phase}_s"] = _mean([float(r[f"time/{phase}_s"]) for r in steps if f"time/{phase}_s" in r])
    out["eval_s"] = sum(_eval_seconds(r, by_step.get(r["step"] - 1)) for r in evals if r["step"] >= 1)
    out["startup_s"] = float(by_step[0]["wall_time"]) - t0 if 0 in by_step else math.nan
    out["total_s"] = float(lines[-1]["wall_time"]) - t0
    out["acc"] = {c: float(by_step[c]["eval/acc"]) for c in (0, *checkpoints) if "eval/acc" in by_step.get(c, {})}
    out["acc_first"] = float(evals[0]["eval/acc"]) if evals else math.nan
    out["acc_last"] = float(evals[-1]["eval/acc"]) if evals else math.nan
    hit = next((r for r in evals if float(r["eval/acc"]) >= threshold), None)
    out["threshold_step"] = int(hit["step"]) if hit else None
    out["threshold_s"] = float(hit["wall_time"]) - t0 if hit else None
    return out


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    """``ours / theirs``; None when either is missing, NaN or ``theirs`` is 0."""
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or theirs == 0:
        return None
    return ours / theirs


def _num(value: Optional[float], fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _threshold_cell(s: Dict[str, Any]) -> str:
    if s["threshold_s"] is None:
        return f"not reached (last {_num(s['acc_last'])} at step {s['steps']})"
    return f"{s['threshold_s']:.1f} s (step {s['threshold_step']})"


def _row(label: str, a: Optional[float], b: Optional[float], fmt: str = "{:.3f}") -> List[str]:
    return [label, _num(a, fmt), _num(b, fmt), _num(ratio(a, b), "{:.2f}")]


def table_rows(ours: Dict[str, Any], trl: Dict[str, Any], checkpoints: Sequence[int]) -> List[List[str]]:
    """``[label, ours, TRL, ours/TRL]`` rows (strings) for :func:`format_table`."""
    rows = [["steps logged", str(ours["steps"]), str(trl["steps"]), ""]]
    rows.append(_row("mean s/step (steps without eval)", ours["step_s"], trl["step_s"]))
    names = {"generate": "generation s/step", "logprob": "old log-probs s/step", "train": "train s/step"}
    rows += [_row(names[p], ours[f"{p}_s"], trl[f"{p}_s"]) for p in PHASES]
    rows.append(_row("evaluation s (all evals after step 0)", ours["eval_s"], trl["eval_s"], "{:.1f}"))
    rows.append(_row("start-up s (to the step-0 eval, included)", ours["startup_s"], trl["startup_s"], "{:.1f}"))
    steps = [0, *checkpoints]
    accs = [" / ".join(_num(s["acc"].get(c)) for c in steps) for s in (ours, trl)]
    rows.append([f"held-out acc @ {' / '.join(map(str, steps))}", *accs, ""])
    ratio_cell = _num(ratio(ours["threshold_s"], trl["threshold_s"]), "{:.2f}")
    rows.append(["wall time to held-out >= threshold", _threshold_cell(ours), _threshold_cell(trl), ratio_cell])
    rows.append(_row("total wall s", ours["total_s"], trl["total_s"], "{:.1f}"))
    rows.append(_row("CPU s, whole run (user+sys, process tree)", ours.get("cpu_s"), trl.get("cpu_s"), "{:.1f}"))
    gib = [None if s.get("peak_pss") is None else s["peak_pss"] / 2**30 for s in (ours, trl)]
    rows.append(_row("peak PSS GiB (whole process tree)", gib[0], gib[1], "{:.2f}"))
    return rows


def format_table(
    ours: Dict[str, Any], trl: Dict[str, Any], checkpoints: Sequence[int], *, trl_name: str = "TRL"
) -> str:
    """A markdown table: this project vs TRL, with the ratio ours/TRL (below 1: this project is better)."""
    rows = [["", "this project", trl_name, "ours/TRL"], *table_rows(ours, trl, checkpoints)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)

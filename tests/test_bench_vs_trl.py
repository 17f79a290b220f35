"""benchmarks/vs_trl.py's own logic, without TRL: the figures and table from synthetic metrics lines,
the TRL flags derived from the resolved demo config, the process-tree PSS sampler on real processes,
and the TRL runner's pure helpers. (The TRL run itself is a manual benchmark, never CI.)"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("trl_report")
T0 = 1000.0


def _lines(eval_logged: bool):
    """Start at t0=1000; step 0 (eval) at 1010; steps of 2 s (gen 1.0, logprob 0.25, train 0.5, sync 0.25),
    evaluated every 2 steps, an eval taking 3 s; acc 0.5, 0.7, 0.92, 0.95 at steps 0, 2, 4, 6."""
    acc = {0: 0.5, 2: 0.7, 4: 0.92, 6: 0.95}
    lines, wall = [{"step": 0, "wall_time": 1010.0, "eval/acc": 0.5}], 1010.0
    for step in range(1, 7):
        wall += 2.0 + (3.0 if step in acc else 0.0)
        line = {"step": step, "wall_time": wall, "time/generate_s": 1.0, "time/logprob_s": 0.25,
                "time/train_s": 0.5, "time/sync_s": 0.25}  # fmt: skip
        if step in acc:
            line["eval/acc"] = acc[step]
            if eval_logged:
                line["time/eval_s"] = 3.0
        lines.append(line)
    return lines


@pytest.mark.parametrize("eval_logged", [True, False])
def test_summarize_hand_computed(eval_logged):
    s = report.summarize(list(reversed(_lines(eval_logged))), t0=T0, threshold=0.9, checkpoints=[2, 4, 8])
    assert s["steps"] == 6
    assert s["step_s"] == pytest.approx(2.0)  # steps 1, 3, 5 (no eval): 2 s each
    assert (s["generate_s"], s["logprob_s"], s["train_s"]) == pytest.approx((1.0, 0.25, 0.5))
    assert s["eval_s"] == pytest.approx(9.0)  # steps 2, 4, 6; estimated from the wall time when not logged
    assert s["startup_s"] == pytest.approx(10.0)
    assert s["total_s"] == pytest.approx(1010 + 6 * 2 + 9 - T0)
    assert s["acc"] == {0: 0.5, 2: 0.7, 4: 0.92}  # step 8 was never evaluated
    assert (s["acc_first"], s["acc_last"]) == (0.5, 0.95)
    assert s["threshold_step"] == 4
    assert s["threshold_s"] == pytest.approx(1010 + 4 * 2 + 2 * 3 - T0)  # the line after step 4's eval


def test_summarize_threshold_never_reached_and_empty():
    s = report.summarize(_lines(True), t0=T0, threshold=0.99, checkpoints=[2])
    assert s["threshold_step"] is None and s["threshold_s"] is None
    with pytest.raises(ValueError, match="no metrics lines"):
        report.summarize([], t0=T0, threshold=0.9, checkpoints=[2])


def test_table_has_every_row_and_the_ratios():
    ours = report.summarize(_lines(False), t0=T0, threshold=0.9, checkpoints=[2, 4])
    trl = report.summarize(_lines(True), t0=T0 - 10.0, threshold=0.96, checkpoints=[2, 4])
    ours.update(peak_pss=2 * 2**30, cpu_s=30.0)
    trl.update(peak_pss=2**30, cpu_s=60.0)
    rows = {r[0]: r[1:] for r in report.table_rows(ours, trl, [2, 4])}
    assert rows["mean s/step (steps without eval)"] == ["2.000", "2.000", "1.00"]
    assert rows["generation s/step"] == ["1.000", "1.000", "1.00"]
    assert rows["held-out acc @ 0 / 2 / 4"][:2] == ["0.500 / 0.700 / 0.920"] * 2
    assert rows["wall time to held-out >= threshold"] == ["24.0 s (step 4)", "not reached (last 0.950 at step 6)",
                                                          "n/a"]  # fmt: skip
    assert rows["total wall s"][2] == f"{(1010 + 21 - T0) / (1010 + 21 - T0 + 10):.2f}"
    assert rows["peak PSS GiB (whole process tree)"] == ["2.00", "1.00", "2.00"]
    assert rows["CPU s, whole run (user+sys, process tree)"] == ["30.0", "60.0", "0.50"]
    table = report.format_table(ours, trl, [2, 4])
    assert table.splitlines()[0].startswith("|  ") and "ours/TRL" in table.splitlines()[0]
    assert set(table.splitlines()[1]) == {"|", "-"}
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned columns


def test_ratio_edge_cases():
    assert report.ratio(1.0, 4.0) == 0.25
    assert report.ratio(None, 1.0) is None and report.ratio(1.0, 0.0) is None and report.ratio(math.nan, 1.0) is None


def test_trl_flags_follow_the_resolved_config(tmp_path):
    from dapo_megatron.config_io import load_config

    vs = _load("vs_trl")
    args = vs.parse_args(["--only", "ours", "--out", str(tmp_path), "--steps", "7", "rollout.n_samples_per_prompt=4"])
    paths = {k: str(tmp_path / k) for k in ("model", "mcore", "train", "eval", "prompts_train", "prompts_eval")}
    cmd = vs.trl_command(paths, str(tmp_path / "log.jsonl"), args)
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    cfg = load_config(args.config, args.overrides)
    assert flags["--n"] == "4" and flags["--steps"] == "7" and flags["--model"] == paths["model"]
    assert flags["--prompts-per-step"] == str(cfg.rollout.prompts_per_step)
    assert flags["--updates-per-step"] == str(cfg.rollout.prompts_per_step // cfg.train.ppo_mini_batch_size)
    assert flags["--max-len"] == str(cfg.rollout.max_response_len)
    assert flags["--overlong-buffer"] == str(cfg.algo.overlong_buffer.len if cfg.algo.overlong_buffer.enable else 0)
    assert (float(flags["--lr"]), float(flags["--eval-top-p"])) == (cfg.optim.lr, cfg.eval.top_p)
    ours = vs.ours_command(paths, str(tmp_path / "ours"), args)
    assert f"model.hf_path={paths['model']}" in ours and f"model.load={paths['mcore']}" in ours  # the same start
    assert "train.total_steps=7" in ours and "rollout.n_samples_per_prompt=4" in ours


def test_tree_pss_counts_a_grandchild():
    """A child that starts a grandchild holding 150 MiB of touched memory: the tree's peak includes it."""
    vs = _load("vs_trl")
    grandchild = "b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {grandchild!r}], check=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    with vs.TreePSS(proc.pid, interval=0.2) as pss:
        proc.wait()
    assert proc.returncode == 0 and pss.samples >= 3
    assert 150 * 2**20 < pss.peak < 600 * 2**20


def test_run_measured_reports_failure_with_the_log(tmp_path):
    vs = _load("vs_trl")
    log = str(tmp_path / "x.log")
    t0, peak, cpu_s = vs.run_measured([sys.executable, "-c", "sum(range(3 * 10**6))"], log, env=dict(os.environ),
                                      interval=0.1)  # fmt: skip
    assert abs(t0 - time.time()) < 60 and peak >= 0 and cpu_s > 0
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*boom"):
        vs.run_measured([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log, env=dict(os.environ),
                        interval=0.1)  # fmt: skip


def test_trl_runner_helpers_without_trl():
    run = _load("trl_grpo_run")
    assert run.cut_at_eos([[5, 6, 1, 0, 0], [5, 6, 7]], 1) == [[5, 6, 1], [5, 6, 7]]
    clock = run.PhaseClock()
    clock.add("generate", 1.5, 1.0)
    clock.add("generate", 0.5, 0.25)
    start = time.perf_counter()
    with clock.timing("train", inner=("generate",)), clock.timing("generate"):  # the inner one: generation only
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    out = clock.take()
    assert 2.2 <= out["time/generate_s"] < 2.0 + elapsed and out["time/generate_cpu_s"] >= 1.25
    assert 0 <= out["time/train_s"] < elapsed - 0.2 + 1e-6  # the outer phase less the nested one
    assert out["time/train_s"] + out["time/generate_s"] - 2.0 == pytest.approx(elapsed, abs=0.05)
    assert clock.take() == {}
    score = run.load_scorer()
    assert score("Answer: 42", "42").acc and not score("Answer: 41", "42").acc


def test_report_only_mixes_a_finished_side_and_one_stopped_early(tmp_path, capsys):
    """TRL finished (its summary in summary.json); ours was stopped: its figures so far come from its
    metrics, the t0 file and the peak-PSS file that run_measured keeps while a run is going."""
    import json

    vs = _load("vs_trl")
    log = str(tmp_path / "probe.log")
    record = str(tmp_path / "probe.start.json")
    vs.run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"], log, env=dict(os.environ), interval=0.1,
                    record=record)  # fmt: skip
    with open(record) as f, open(record + ".pss") as g:
        assert json.load(f)["t0"] > 0 and int(g.read()) > 0

    trl = report.summarize(_lines(True), t0=T0, threshold=0.9, checkpoints=[4])  # step 2 is recomputed below
    trl.update(peak_pss=2**30, cpu_s=10.0)
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _lines(True)))
    machine = {"cpu": "test cpu", "cores": 2, "commit": "abc", "load_before": [1.0], "load_after": [2.0]}
    (tmp_path / "summary.json").write_text(json.dumps({"trl": trl, "machine": machine}))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _lines(False)[:4]))
    (tmp_path / "ours.start.json").write_text(json.dumps({"t0": T0, "pid": 1}))
    (tmp_path / "ours.start.json.pss").write_text(str(3 * 2**30))
    assert vs.main(["--report-only", "--out", str(tmp_path), "--checkpoints", "2", "4"]) == 0
    text = (tmp_path / "vs_trl.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:5]] for r in text.splitlines() if "|" in r}
    assert rows["steps logged"] == ["3", "6", ""]
    assert rows["peak PSS GiB (whole process tree)"] == ["3.00", "1.00", "3.00"]
    assert rows["CPU s, whole run (user+sys, process tree)"] == ["n/a", "10.0", "n/a"]
    assert rows["wall time to held-out >= threshold"][1] == "24.0 s (step 4)"
    assert rows["held-out acc @ 0 / 2 / 4"] == ["0.500 / 0.700 / n/a", "0.500 / 0.700 / 0.920", ""]
    assert "stopped early (figures so far): ours" in text and "load average 1.00 before, 2.00 after" in text


def test_memory_breakdown_places_each_steps_peak_in_its_phase():
    """Three steps ending at t=10, 20, 30. The train phase ends sync + eval + trim seconds before a
    step's end: steps 1-2 train in [end-3, end-0.5], step 3 (with a 5 s evaluation) in [22, 24.5].
    Peaks: step 1 at t=8 (train), step 2 at t=12 (generation), step 3 at t=23 (train; t=28 would be
    its evaluation)."""
    mb = _load("memory_breakdown")
    mib = 2**20
    phases = {"time/train_s": 2.5, "time/sync_s": 0.4, "time/heap_trim_s": 0.1}
    steps = [{"step": 0, "wall_time": 0.0}, {"step": 1, "wall_time": 10.0, **phases},
             {"step": 2, "wall_time": 20.0, **phases},
             {"step": 3, "wall_time": 30.0, "time/eval_s": 5.0, **phases}]  # fmt: skip
    samples = [(1.0, 500 * mib), (8.0, 700 * mib), (9.5, 510 * mib),  # step 1
               (12.0, 650 * mib), (15.0, 520 * mib), (19.0, 600 * mib),  # step 2
               (21.0, 505 * mib), (23.0, 640 * mib), (28.0, 560 * mib), (35.0, 900 * mib)]  # fmt: skip
    ph = mb.peak_phases(samples, steps)
    assert ph == {"floor_median": 505.0, "floor_max": 520.0, "peak_median": 650.0, "peak_max": 700.0,
                  "steps": 3, "peaks_in_train": 2}  # fmt: skip
    late = [(t + 5.0 if t == 23.0 else t, pss) for t, pss in samples]  # step 3 now peaks in its evaluation
    assert mb.peak_phases(late, steps)["peaks_in_train"] == 1
    assert mb.peak_phases([(40.0, mib)], steps) == {"steps": 0, "peaks_in_train": 0}

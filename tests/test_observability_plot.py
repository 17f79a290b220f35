"""Charts from synthetic metrics.jsonl files: expected charts written, runs overlaid, gaps skipped."""

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread

from dapo_megatron.errors import InputError
from dapo_megatron.observability import metric_names as M
from dapo_megatron.observability.plot import CHARTS, load_series, plot_run


def _write_run(folder, keys, steps=6, scale=1.0):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(steps):
            rec = {"step": s, "wall_time": 0.0, **{k: scale * (s + 1) for k in keys}}
            f.write(json.dumps(rec) + "\n")
    return str(folder)


def _assert_real_png(path):
    """The file decodes as an image of a sensible size that is not one flat colour."""
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01, f"{path} is blank"
    return img


def test_two_runs_all_metrics_write_every_chart(tmp_path):
    dapo = _write_run(tmp_path / "dapo", M.ALL_KEYS)
    grpo = _write_run(tmp_path / "grpo", M.ALL_KEYS, scale=0.5)
    out = tmp_path / "plots"
    written = plot_run([dapo, grpo], str(out), labels=["DAPO", "GRPO"])
    assert sorted(written) == sorted(str(out / f"{stem}.png") for stem in CHARTS)
    for path in written:
        _assert_real_png(path)


def test_missing_metrics_are_skipped_and_empty_charts_not_written(tmp_path):
    # Run A has only rewards; run B has rewards and clip fractions (high only) and a NaN gap.
    a = _write_run(tmp_path / "a", [M.REWARD_ACC, M.REWARD_MEAN])
    b = _write_run(tmp_path / "b", [M.REWARD_ACC, M.ACTOR_CLIP_FRAC_HIGH])
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, M.ACTOR_CLIP_FRAC_HIGH: None, "nonfinite": [M.ACTOR_CLIP_FRAC_HIGH]}) + "\n")
    out = tmp_path / "plots"
    written = plot_run([a, b], str(out))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["clip_fraction.png", "reward.png"]
    assert sorted(x.name for x in out.iterdir()) == ["clip_fraction.png", "reward.png"]
    for path in written:
        _assert_real_png(path)


def test_more_panels_make_a_taller_chart(tmp_path):
    one = _write_run(tmp_path / "one", [M.TIME_GENERATE])
    five = _write_run(tmp_path / "five", M.TIME_KEYS)
    (p1,) = plot_run([one], str(tmp_path / "p1"))
    (p5,) = plot_run([five], str(tmp_path / "p5"))
    assert imread(p5).shape[0] > 3 * imread(p1).shape[0]


def test_load_series_last_record_of_a_repeated_step_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, M.REWARD_ACC: 0.1},
        {"step": 2, M.REWARD_ACC: 0.2},
        {"step": 2, M.REWARD_ACC: 0.3},
        {"step": 3, M.REWARD_ACC: None},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    steps, values = load_series(str(path))[M.REWARD_ACC]
    assert steps == [1, 2, 3]
    assert values[:2] == [0.1, 0.3] and values[2] != values[2]  # NaN gap


def test_label_count_must_match(tmp_path):
    a = _write_run(tmp_path / "a", [M.REWARD_ACC])
    with pytest.raises(ValueError, match="one label per run"):
        plot_run([a], str(tmp_path / "p"), labels=["x", "y"])
    with pytest.raises(InputError, match="nope: not found; expected a run folder"):
        plot_run([str(tmp_path / "nope")], str(tmp_path / "p"))


def test_plot_cli(tmp_path):
    a = _write_run(tmp_path / "x" / "run", [M.REWARD_ACC, M.ACTOR_ENTROPY])
    b = _write_run(tmp_path / "y" / "run", [M.REWARD_ACC])
    out = tmp_path / "charts"
    cmd = [sys.executable, "-m", "dapo_megatron.cli", "plot", a, b, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(x.name for x in out.iterdir()) == ["entropy.png", "reward.png"]
    assert str(out / "reward.png") in proc.stdout
    empty = _write_run(tmp_path / "empty", [])
    proc = subprocess.run(
        [sys.executable, "-m", "dapo_megatron.cli", "plot", empty, "--out", str(out / "e")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "no metrics" in proc.stderr

"""The run directory: layout, config dump, and refusing folders that are not ours."""

import os

import pytest

from dapo_megatron.config import Config, RunConfig
from dapo_megatron.config_io import load_config
from dapo_megatron.controller.run_dir import MARKER, RunDirError, RunPaths, prepare_run_dir


def test_fresh_run_dir_layout_and_config(tmp_path):
    cfg = Config(run=RunConfig(dir=str(tmp_path / "run"), name="t1"))
    paths = prepare_run_dir(cfg.run.dir, resume=False, config=cfg)
    assert paths == RunPaths.under(str(tmp_path / "run"))
    assert paths.root == str(tmp_path / "run") and os.path.isabs(paths.root)
    for folder in (paths.checkpoints_dir, paths.logs_dir, paths.rollouts_dir):
        assert os.path.isdir(folder)
    assert os.path.isfile(os.path.join(paths.root, MARKER))
    assert paths.metrics_path == os.path.join(paths.root, "metrics.jsonl")
    assert load_config(paths.config_path) == cfg  # the dumped config round-trips exactly


def test_empty_existing_folder_is_accepted(tmp_path):
    (tmp_path / "run").mkdir()
    paths = prepare_run_dir(str(tmp_path / "run"), resume=False)
    assert os.path.isdir(paths.logs_dir)
    assert not os.path.exists(paths.config_path)  # no config given, none written


def test_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    for resume in (True, False):
        with pytest.raises(RunDirError, match="not a dapo_megatron run"):
            prepare_run_dir(str(tmp_path / "home"), resume=resume)
    assert sorted(os.listdir(tmp_path / "home")) == ["thesis.tex"]  # nothing was written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(str(tmp_path / "afile"), resume=True)


def test_resume_rules_for_our_own_run(tmp_path):
    root = str(tmp_path / "run")
    first = Config(run=RunConfig(dir=root))
    paths = prepare_run_dir(root, resume=False, config=first)
    # No progress yet: a relaunch without resume may reuse it.
    prepare_run_dir(root, resume=False, config=first)
    with open(paths.metrics_path, "w") as f:
        f.write('{"step": 1}\n')
    with pytest.raises(RunDirError, match="run.resume=true"):
        prepare_run_dir(root, resume=False, config=first)
    second = Config(run=RunConfig(dir=root, save_every=5))
    again = prepare_run_dir(root, resume=True, config=second)
    assert again == paths
    assert load_config(paths.config_path) == second
    kept = [name for name in os.listdir(paths.logs_dir) if name.startswith("config.")]
    assert len(kept) == 1
    assert load_config(os.path.join(paths.logs_dir, kept[0])) == first
    # The same config again leaves no extra copy behind.
    prepare_run_dir(root, resume=True, config=second)
    assert len([n for n in os.listdir(paths.logs_dir) if n.startswith("config.")]) == 1


def test_checkpoints_alone_count_as_progress(tmp_path):
    root = str(tmp_path / "run")
    paths = prepare_run_dir(root, resume=True)
    os.makedirs(os.path.join(paths.checkpoints_dir, "step_00000010"))
    with pytest.raises(RunDirError):
        prepare_run_dir(root, resume=False)

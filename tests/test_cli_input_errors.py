"""Bad input to any entry point is one line on stderr naming the input, exit status 2, no traceback.

Each case runs the real command in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_naming(done: subprocess.CompletedProcess, name: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # Libraries may warn on import; the error itself is the last line and is the only one naming the input.
    assert name in lines[-1], lines[-1]
    assert sum(name in line for line in lines) == 1, lines


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run("-m", "dapo_megatron", *args, cwd=cwd)


def _prompt_file(folder: Path) -> Path:
    path = folder / "eval.jsonl"
    row = {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2", "style": "rule"}}
    path.write_text(json.dumps(row) + "\n")
    return path


def test_config_on_a_directory(tmp_path):
    (tmp_path / "conf_dir").mkdir()
    _assert_one_line_naming(_cli("config", "--config", "conf_dir", cwd=tmp_path), "conf_dir")


def test_config_on_a_non_utf8_file(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"run:\n  dir: caf\xe9\n")
    _assert_one_line_naming(_cli("config", "--config", "latin1.yaml", cwd=tmp_path), "latin1.yaml")


def test_plot_on_a_missing_folder(tmp_path):
    _assert_one_line_naming(_cli("plot", "no_such_run", cwd=tmp_path), "no_such_run")


def test_plot_on_a_malformed_metrics_line(tmp_path):
    run = tmp_path / "run_bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 0.5}\n{not json\n{"step": 1, "reward/mean": 0.6}\n')
    done = _cli("plot", "run_bad", cwd=tmp_path)
    _assert_one_line_naming(done, "metrics.jsonl:2")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_eval_on_corrupt_safetensors(tmp_path, damage):
    from weights_cases import make_tiny_hf_model

    model = tmp_path / "model_bad"
    make_tiny_hf_model(str(model), "qwen2_gqa2_untied", layers=1)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    eval_files = f"data.eval_files=[{_prompt_file(tmp_path)}]"
    _assert_one_line_naming(_cli("eval", "--model", "model_bad", eval_files, cwd=tmp_path), "model.safetensors")


def test_converter_on_a_non_utf8_config(tmp_path):
    model = tmp_path / "model_latin1"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"model_type": "qwen2", "name": "caf\xe9"}')
    tool = str(REPO / "tools" / "convert_hf_to_megatron.py")
    done = _run(tool, "--hf-dir", "model_latin1", "--out", "ckpt", cwd=tmp_path)
    _assert_one_line_naming(done, "config.json")
    assert not (tmp_path / "ckpt").exists()


def test_exporter_on_a_non_utf8_config(tmp_path):
    model = tmp_path / "model_latin1"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"model_type": "qwen2", "name": "caf\xe9"}')
    tool = str(REPO / "tools" / "convert_megatron_to_hf.py")
    done = _run(tool, "--ckpt", "ckpt", "--hf-dir", "model_latin1", "--out", "out", cwd=tmp_path)
    _assert_one_line_naming(done, "config.json")

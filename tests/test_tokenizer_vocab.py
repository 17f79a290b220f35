"""A tokenizer larger than the model's vocabulary is refused at start-up by ``train`` and ``export``.

Token ids at or above ``vocab_size`` have no embedding row and no logit: the policy can never
sample them, and prompts that contain them index past the table. Both commands must say so with the
two numbers before any work starts. Real tokenizers: the demo's character-level one, grown with
added tokens where a test needs it larger.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli_runs import BIN, TINY, cli_env, write_demo_assets
from tests.weights_cases import make_tiny_hf_model, run_tool


def _tokenizer_len(folder) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_demo_assets(tmp_path_factory.mktemp("vocab_assets"))


def test_train_refuses_a_tokenizer_larger_than_the_model(assets, tmp_path):
    tokens = _tokenizer_len(assets / "model")
    small = tmp_path / "small_model"
    shutil.copytree(assets / "model", small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = tokens - 2
    (small / "config.json").write_text(json.dumps(config))
    args = [*BIN, "train", "--config", TINY, f"run.dir={tmp_path / 'r'}", f"model.hf_path={small}", "run.eval_every=0"]
    done = subprocess.run(args, env=cli_env(assets), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "model.hf_path" in line and str(small) in line, line
    assert f"{tokens} tokens" in line and f"vocab_size={tokens - 2}" in line, line
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted one-layer checkpoint of an HF model with vocab_size 250 (256 rows once padded)."""
    root = tmp_path_factory.mktemp("vocab_export")
    make_tiny_hf_model(str(root / "hf"), "qwen2_gqa2_untied", layers=1)
    done = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "hf", root / "ckpt"


def _hf_dir_with_tokenizer(hf: Path, folder: Path, extra_tokens: int) -> int:
    """``hf`` copied to ``folder`` with the demo tokenizer plus ``extra_tokens`` added; its length."""
    from dapo_megatron.controller.demo_task import build_demo_tokenizer

    shutil.copytree(hf, folder)
    for stand_in in ("tokenizer_config.json", "special_tokens_map.json"):  # make_tiny_hf_model's placeholders
        (folder / stand_in).unlink()
    tok = build_demo_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    tok.save_pretrained(str(folder))
    return len(tok)


def _export(ckpt: Path, hf_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return run_tool("convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--hf-dir", str(hf_dir), "--out", str(out))


def test_export_refuses_a_tokenizer_larger_than_the_model(checkpoint, tmp_path):
    hf, ckpt = checkpoint
    tokens = _hf_dir_with_tokenizer(hf, tmp_path / "big", extra_tokens=300)
    assert tokens > 256
    done = _export(ckpt, tmp_path / "big", tmp_path / "out")
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "big") in line and f"{tokens} tokens" in line, line
    assert "vocab_size=250" in line and "256 checkpoint embedding rows" in line, line
    assert not (tmp_path / "out").exists()


def test_export_keeps_a_tokenizer_that_fits(checkpoint, tmp_path):
    hf, ckpt = checkpoint
    tokens = _hf_dir_with_tokenizer(hf, tmp_path / "fits", extra_tokens=0)
    done = _export(ckpt, tmp_path / "fits", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _tokenizer_len(tmp_path / "out") == tokens

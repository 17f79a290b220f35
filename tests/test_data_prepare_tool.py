"""tools/prepare_dapo_data.py run as a subprocess on small files."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_megatron.data import load_prompt_rows

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "prepare_dapo_data.py"


def _row(problem: str, answer, index: int) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": problem}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help(tmp_path):
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "--dedup" in done.stdout and "--skip-malformed" in done.stdout


def test_dedup_and_skip_malformed_writes_clean_parquet(tmp_path):
    rows = [_row(f"problem {i % 3}", str(i % 3), i) for i in range(9)]  # 3 distinct problems, 3x each
    rows[4]["reward_model"]["ground_truth"] = None  # malformed (a "problem 1" copy)
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(src))
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps(_row("problem 3", "3", 100)) + "\nnot json\n")
    out = tmp_path / "clean.parquet"
    done = _run(str(src), str(extra), "-o", str(out), "--dedup", "--skip-malformed", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rows in 11, rows out 4, duplicates dropped 5, malformed skipped 2" in done.stdout
    table = pq.read_table(str(out))
    assert table.num_rows == 4
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    first = table.to_pylist()[0]
    assert first["reward_model"] == {"ground_truth": "0", "style": "rule-lighteval/MATH_v2"}
    assert first["ability"] == "MATH" and first["extra_info"] == {"index": 0}
    # the output loads with the trainer's loader, and its content is as read (template none)
    loaded, stats = load_prompt_rows([str(out)], template="none")
    assert [r.messages[0]["content"] for r in loaded] == ["problem 0", "problem 1", "problem 2", "problem 3"]
    assert stats["malformed_skipped"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.parquet", "dapo.parquet", "more.jsonl"]


def test_malformed_without_skip_fails_and_leaves_no_output(tmp_path):
    rows = [_row(f"problem {i}", str(i), i) for i in range(5)]
    del rows[3]["reward_model"]
    src = tmp_path / "aime.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.parquet"
    done = _run(str(src), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 1
    assert f"{src} row 3 (line 4): field 'reward_model' is missing" in done.stderr
    assert "--skip-malformed" in done.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aime.jsonl"]  # no temp file either


def test_template_dapo_and_missing_input(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps(_row("What is 2+2?", "4", 0)) + "\n")
    out = tmp_path / "t.parquet"
    done = _run(str(src), "-o", str(out), "--template", "dapo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    content = pq.read_table(str(out)).to_pylist()[0]["prompt"][0]["content"]
    assert content.startswith("Solve the following math problem step by step.") and "What is 2+2?" in content
    done = _run(str(tmp_path / "absent.parquet"), "-o", str(tmp_path / "x.parquet"), cwd=tmp_path)
    assert done.returncode == 1 and "prompt file not found" in done.stderr and "absent.parquet" in done.stderr
    assert not (tmp_path / "x.parquet").exists()

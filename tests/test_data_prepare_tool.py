"""tools/prepare_dapo_data.py run as a subprocess on small files."""

from __future__ import annotations

import json
import os
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
    assert done.returncode == 2  # the input was refused (1: writing failed)
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
    assert done.returncode == 2 and "prompt file not found" in done.stderr and "absent.parquet" in done.stderr
    assert not (tmp_path / "x.parquet").exists()


def _listing(folder):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def test_output_that_is_an_input_is_refused(tmp_path):
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([_row(f"p{i}", str(i), i) for i in range(3)]), str(src))
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps(_row("q", "1", 0)) + "\n")
    link = tmp_path / "link.parquet"
    link.symlink_to(src)
    hard = tmp_path / "hard.parquet"
    os.link(src, hard)
    before = src.read_bytes()
    # the same file by another spelling, through a symlink or a hard link, and as the second of several inputs
    for out in (str(src), f"{tmp_path}/./dapo.parquet", str(link), str(hard)):
        for inputs in ([str(src)], [str(other), str(src)]):
            done = _run(*inputs, "-o", out, "--dedup", cwd=tmp_path)
            assert done.returncode == 2, (out, inputs, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "is also an input" in done.stderr and "-o/--output" in done.stderr
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dapo.parquet", "hard.parquet", "link.parquet", "more.jsonl"]


def test_empty_input_is_refused_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([_row("p", "1", 0)]).slice(0, 0), str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "out.parquet"
    for args in ([str(empty)], [str(blank)], [str(bad), "--skip-malformed"]):
        done = _run(*args, "-o", str(out), cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "no output written" in done.stderr and not out.exists()
    assert "no data rows" in _run(str(empty), "-o", str(out), cwd=tmp_path).stderr
    assert "no usable prompt rows" in _run(str(bad), "-o", str(out), "--skip-malformed", cwd=tmp_path).stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "blank.jsonl", "empty.parquet"]


def test_unreadable_input_is_one_line_naming_file_and_flag(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_bytes(json.dumps(_row("a", "1", 0)).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    out = tmp_path / "out.parquet"
    done = _run(str(src), "-o", str(out), cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{src} row 1 (line 2)" in done.stderr and "--skip-malformed" in done.stderr
    assert "data.skip_malformed" not in done.stderr  # the tool's own flag, not the trainer's key
    done = _run(str(src), "-o", str(out), "--skip-malformed", cwd=tmp_path)
    assert done.returncode == 0 and "rows out 1" in done.stdout and "malformed skipped 1" in done.stdout

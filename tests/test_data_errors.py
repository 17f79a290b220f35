"""Bad prompt data is refused at load time, and every refusal names the file, the row or line, and
the config key that fixes it (issue 15, items 10 and 11)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_megatron.config import Config, DataConfig, RolloutConfig
from dapo_megatron.controller.prompts import load_prompts
from dapo_megatron.data import (
    DataError,
    DataFileError,
    EmptyDatasetError,
    MalformedRowError,
    PromptDataset,
    PromptTooLongError,
    load_prompt_rows,
)
from dapo_megatron.data.dataset import CHARS_PER_TOKEN_BOUND
from tests.test_data_dataset import _tiny_tokenizer, dapo_row, write_jsonl, write_parquet


def _cfg(train=(), eval_files=(), max_prompt_len=100, template="none", skip=False) -> Config:
    data = DataConfig(train_files=tuple(train), eval_files=tuple(eval_files), template=template, skip_malformed=skip)
    return Config(rollout=RolloutConfig(max_prompt_len=max_prompt_len), data=data)


class SpyTokenizer:
    """The tiny test tokenizer, counting every call and the characters it was asked to encode."""

    def __init__(self):
        self.tok, _ = _tiny_tokenizer()
        self.calls, self.chars = 0, 0

    def apply_chat_template(self, messages, **kw):
        self.calls += 1
        self.chars += sum(len(m["content"]) for m in messages)
        return self.tok.apply_chat_template(messages, **kw)

    def encode(self, text):
        self.calls += 1
        self.chars += len(text)
        return self.tok.encode(text)


# ---------------------------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("content", ["", "  \n\t "])
@pytest.mark.parametrize("template", ["none", "dapo"])
def test_empty_prompt_content_is_refused_at_load_with_file_and_row(tmp_path, content, template):
    rows = [dapo_row("what is one ?", "1", templated=False), dapo_row(content, "2", templated=False)]
    for path in (write_jsonl(tmp_path / "t.jsonl", rows), write_parquet(tmp_path / "t.parquet", rows)):
        with pytest.raises(MalformedRowError) as info:
            load_prompt_rows([path], template=template)
        msg = str(info.value)
        where = f"{path} row 1" + (" (line 2)" if path.endswith(".jsonl") else "")
        assert msg.startswith(f"{where}: field 'prompt[0].content' must not be empty"), msg
        assert "data.skip_malformed=true" in msg and "data.train_files" in msg
        kept, stats = load_prompt_rows([path], template=template, skip_malformed=True)
        assert [r.ground_truth for r in kept] == ["1"] and stats["malformed_skipped"] == 1


def test_prompt_that_tokenizes_to_nothing_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [dapo_row("what is one ?", "1", templated=False)])
    ds, _ = PromptDataset.from_files([path], template="none")

    class Silent:
        def encode(self, text):
            return []

    with pytest.raises(DataError) as info:
        ds.tokenize(0, Silent(), apply_chat_template=False, max_prompt_len=10)
    msg = str(info.value)
    assert msg.startswith(f"{path} row 0 (line 1): prompt has no tokens"), msg
    assert "data.train_files" in msg


# ---------------------------------------------------------------------------------------------- item 11: jsonl


def test_invalid_utf8_and_too_deep_jsonl_lines_name_the_line_and_are_skippable(tmp_path):
    path = tmp_path / "t.jsonl"
    good = [json.dumps(dapo_row(p, str(i))).encode() for i, p in enumerate(["a", "b", "c"])]
    bad_utf8 = json.dumps(dapo_row("d", "9")).encode().replace(b'"d', b'"\xff\xfe d')
    deep = b"[" * 200_000
    path.write_bytes(b"\n".join([good[0], bad_utf8, good[1], deep, good[2]]) + b"\n")
    with pytest.raises(MalformedRowError) as info:
        load_prompt_rows([str(path)])
    msg = str(info.value)
    assert msg.startswith(f"{path} row 1 (line 2): field '<line>' must be UTF-8"), msg
    assert "data.skip_malformed=true" in msg and "data.train_files" in msg
    kept, stats = load_prompt_rows([str(path)], skip_malformed=True)
    assert [r.ground_truth for r in kept] == ["0", "1", "2"]
    assert stats == {"rows_read": 5, "malformed_skipped": 2, "duplicates_dropped": 0}


# ---------------------------------------------------------------------------------------------- item 11: parquet


def _parquet_bytes(tmp_path) -> bytes:
    rows = [dapo_row(f"problem {i} " + "x" * 100, str(i)) for i in range(2000)]
    return pa_write(tmp_path / "src.parquet", rows)


def pa_write(path, rows) -> bytes:
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=500)
    return path.read_bytes()


def _corrupt_middle(data: bytes) -> bytes:
    mid = bytearray(data)
    for i in range(len(data) // 3, 2 * len(data) // 3):
        mid[i] = 0xAB
    return bytes(mid)


@pytest.mark.parametrize(
    "name, make",
    [
        ("zero_bytes", lambda d: b""),
        ("truncated", lambda d: d[: len(d) // 2]),
        ("corrupt_middle", _corrupt_middle),
        ("not_parquet", lambda d: b"hello, I am a text file\n"),
    ],
)
def test_unreadable_parquet_names_the_file_and_the_key(tmp_path, name, make):
    good = write_jsonl(tmp_path / "good.jsonl", [dapo_row("a", "1")])
    bad = tmp_path / f"{name}.parquet"
    bad.write_bytes(make(_parquet_bytes(tmp_path)))
    with pytest.raises(DataFileError) as info:
        load_prompt_rows([good, str(bad)], skip_malformed=True)  # a broken file is never "skipped"
    msg = str(info.value)
    assert msg.startswith(f"{bad}: "), msg
    assert "parquet" in msg and "data.train_files" in msg and "\n" not in msg
    assert info.value.path == str(bad)


@pytest.mark.parametrize("kind", ["empty_parquet", "zero_byte_jsonl", "blank_jsonl"])
def test_file_without_rows_is_refused_by_name(tmp_path, kind):
    good = write_jsonl(tmp_path / "good.jsonl", [dapo_row("a", "1")])
    if kind == "empty_parquet":
        empty = tmp_path / "empty.parquet"
        pq.write_table(pa.Table.from_pylist([dapo_row("a", "1")]).slice(0, 0), str(empty))
    else:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("" if kind == "zero_byte_jsonl" else "\n  \n\n")
    with pytest.raises(DataFileError) as info:
        load_prompt_rows([good, str(empty)])
    msg = str(info.value)
    assert msg.startswith(f"{empty}: no data rows"), msg
    assert "data.train_files" in msg


# ---------------------------------------------------------------------------------------------- item 11: empty dataset


def test_no_usable_rows_names_files_counts_and_key(tmp_path):
    bad = dapo_row("a", "1")
    bad["reward_model"]["ground_truth"] = None
    path = write_jsonl(tmp_path / "t.jsonl", [bad, bad])
    with pytest.raises(EmptyDatasetError) as info:
        load_prompt_rows([path], skip_malformed=True)
    msg = str(info.value)
    assert msg.startswith("data.train_files: no usable prompt rows"), msg
    assert path in msg and "rows read 2" in msg and "malformed skipped 2" in msg
    with pytest.raises(EmptyDatasetError):
        PromptDataset.from_files([path], skip_malformed=True)


# ---------------------------------------------------------------------------------------------- item 11: long prompts


def test_huge_prompt_is_refused_by_characters_before_tokenizing(tmp_path):
    huge = "what is one ? " * (5_000_000 // 14)  # ~5 MB
    rows = [dapo_row("what is one ?", "1", templated=False), dapo_row(huge, "2", templated=False)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    tok = SpyTokenizer()
    start = time.perf_counter()
    with pytest.raises(MalformedRowError) as info:
        load_prompts([path], tok, _cfg(train=[path], max_prompt_len=2048))
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert msg.startswith(f"{path} row 1 (line 2): field 'prompt' has {len(huge)} characters"), msg
    assert f"{2048 * CHARS_PER_TOKEN_BOUND}" in msg and "rollout.max_prompt_len=2048" in msg
    assert "data.skip_malformed=true" in msg and "filter_too_long" not in msg
    assert tok.calls == 0 and elapsed < 2.0, (tok.calls, elapsed)
    # skipped with data.skip_malformed: the other rows are tokenized, the huge one never is
    data, ids = load_prompts([path], tok, _cfg(train=[path], max_prompt_len=2048, skip=True), skip_malformed=True)
    assert len(data) == 1 and tok.chars < 1000


def test_prompt_over_the_token_limit_names_file_row_and_keys(tmp_path):
    rows = [
        dapo_row("what is one ?", "1", templated=False),
        dapo_row("what is one plus one plus two ?", "4", templated=False),  # 11 tokens with the chat template
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    tok, _ = _tiny_tokenizer()
    with pytest.raises(PromptTooLongError) as info:
        load_prompts([path], tok, _cfg(train=[path], max_prompt_len=8))
    msg = str(info.value)
    assert msg.startswith(f"{path} row 1 (line 2): prompt has 11 tokens, more than rollout.max_prompt_len=8"), msg
    assert "data.skip_malformed=true" in msg and "data.train_files" in msg and "filter_too_long" not in msg
    data, ids = load_prompts([path], tok, _cfg(train=[path], max_prompt_len=8, skip=True), skip_malformed=True)
    assert [r.ground_truth for r in data.rows] == ["1"] and len(ids) == 1 and len(ids[0]) <= 8
    # every row too long: an empty dataset, named as such
    with pytest.raises(EmptyDatasetError, match="data.train_files: no usable prompt rows"):
        load_prompts([path], tok, _cfg(train=[path], max_prompt_len=3, skip=True), skip_malformed=True)


def test_eval_file_errors_name_data_eval_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [dapo_row("what is one ?", "1", templated=False)])
    path = write_jsonl(tmp_path / "aime.jsonl", [dapo_row("", "1", templated=False)])
    tok, _ = _tiny_tokenizer()
    with pytest.raises(MalformedRowError) as info:
        load_prompts([path], tok, _cfg(train=[train], eval_files=[path]))
    msg = str(info.value)
    assert msg.startswith(f"{path} row 0 (line 1): field 'prompt[0].content' must not be empty"), msg
    assert "data.eval_files" in msg and "skip_malformed" not in msg  # eval rows are never skipped

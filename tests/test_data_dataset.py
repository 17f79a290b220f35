"""Prompt files (parquet / jsonl): schema, template, dedup, malformed rows, tokenization, avg@k."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_megatron.data import (
    DAPO_TEMPLATE,
    MalformedRowError,
    PromptDataset,
    PromptRow,
    PromptTooLongError,
    eval_avg_at_k,
    format_dapo_prompt,
    load_prompt_rows,
)

# The spec's template, typed out independently ("\n\n" in the spec stands for two newlines).
SPEC_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form Answer: "
    "$Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def dapo_row(problem: str, answer: str, index: int = 0, *, templated: bool = True) -> dict:
    content = SPEC_TEMPLATE.replace("{problem}", problem) if templated else problem
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": content}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": str(index)},
    }


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------- template


def test_template_is_the_spec_text_verbatim():
    assert DAPO_TEMPLATE == SPEC_TEMPLATE
    text = format_dapo_prompt(r"Find $x$ if $\frac{x}{2} = {3}$.")
    assert text == SPEC_TEMPLATE.replace("{problem}", r"Find $x$ if $\frac{x}{2} = {3}$.")
    assert text.endswith('\n\nRemember to put your answer on its own line after "Answer:".')


def test_template_dapo_wraps_raw_problems_and_keeps_templated_ones(tmp_path):
    rows = [dapo_row("What is 1+1?", "2", templated=True), dapo_row("What is 2+2?", "4", templated=False)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dapo, _ = load_prompt_rows([path], template="dapo")
    assert dapo[0].messages[0]["content"] == format_dapo_prompt("What is 1+1?")  # not wrapped twice
    assert dapo[1].messages[0]["content"] == format_dapo_prompt("What is 2+2?")
    none, _ = load_prompt_rows([path], template="none")
    assert none[1].messages[0]["content"] == "What is 2+2?"
    assert none[0].problem_key == format_dapo_prompt("What is 1+1?")
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        load_prompt_rows([path], template="chatml")


# ---------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_schema_round_trip(tmp_path, fmt):
    rows = [dapo_row(f"Problem {i}: compute {i}*{i}.", str(i * i), i) for i in range(5)]
    rows[2]["prompt"] = [{"role": "system", "content": "Be careful."}] + rows[2]["prompt"]
    writer = write_parquet if fmt == "parquet" else write_jsonl
    path = writer(tmp_path / f"train.{fmt}", rows)
    loaded, stats = load_prompt_rows([path])
    assert stats == {"rows_read": 5, "malformed_skipped": 0, "duplicates_dropped": 0}
    assert [r.index for r in loaded] == [0, 1, 2, 3, 4]
    assert [r.ground_truth for r in loaded] == ["0", "1", "4", "9", "16"]
    assert all(isinstance(r, PromptRow) and r.data_source == "math_dapo" for r in loaded)
    assert loaded[3].messages == ({"role": "user", "content": format_dapo_prompt("Problem 3: compute 3*3.")},)
    assert loaded[2].messages[0] == {"role": "system", "content": "Be careful."}
    assert loaded[2].problem_key == loaded[2].messages[1]["content"]


def test_parquet_is_read_across_several_record_batches(tmp_path):
    rows = [dapo_row(f"p{i % 7000}", str(i), i) for i in range(20000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=3000)
    loaded, stats = load_prompt_rows([str(path)], dedup=True)
    assert stats == {"rows_read": 20000, "malformed_skipped": 0, "duplicates_dropped": 13000}
    assert len(loaded) == 7000
    assert loaded[6999].ground_truth == "6999" and loaded[-1].index == 6999


def test_several_files_in_order_and_dedup_counts(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [dapo_row("x", "1"), dapo_row("y", "2"), dapo_row("x", "1")])
    b = write_jsonl(tmp_path / "b.jsonl", [dapo_row("y", "2"), dapo_row("z", "3"), dapo_row("y", "2")])
    rows, stats = load_prompt_rows([a, b], dedup=True)
    assert [r.ground_truth for r in rows] == ["1", "2", "3"]
    assert [r.index for r in rows] == [0, 1, 2]
    assert stats == {"rows_read": 6, "malformed_skipped": 0, "duplicates_dropped": 3}
    # a raw problem and its templated form are the same problem under template="dapo"
    c = write_jsonl(tmp_path / "c.jsonl", [dapo_row("z", "3", templated=False)])
    rows, stats = load_prompt_rows([b, c], dedup=True)
    assert len(rows) == 2 and stats["duplicates_dropped"] == 2
    rows, stats = load_prompt_rows([a, b], dedup=False)
    assert len(rows) == 6 and stats["duplicates_dropped"] == 0


def test_blank_jsonl_lines_are_ignored(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(dapo_row("a", "1")) + "\n\n   \n" + json.dumps(dapo_row("b", "2")) + "\n")
    rows, stats = load_prompt_rows([str(path)])
    assert len(rows) == 2 and stats["rows_read"] == 2


# ---------------------------------------------------------------------------------------------- malformed rows


def _missing_reward_model():
    r = dapo_row("q", "1")
    del r["reward_model"]
    return r


def _ground_truth_none():
    r = dapo_row("q", "1")
    r["reward_model"]["ground_truth"] = None
    return r


def _ground_truth_int():
    r = dapo_row("q", "1")
    r["reward_model"]["ground_truth"] = 17
    return r


def _prompt_is_string():
    r = dapo_row("q", "1")
    r["prompt"] = "just a string"
    return r


def _message_without_content():
    r = dapo_row("q", "1")
    r["prompt"] = [{"role": "user"}]
    return r


def _no_user_message():
    r = dapo_row("q", "1")
    r["prompt"] = [{"role": "system", "content": "hi"}]
    return r


BAD_ROWS = [
    (_missing_reward_model, "reward_model", "is missing; expected {ground_truth: str, style: str}"),
    (_ground_truth_none, "reward_model.ground_truth", "must be a string, got None"),
    (_ground_truth_int, "reward_model.ground_truth", "must be a string, got int 17"),
    (_prompt_is_string, "prompt", "must be a non-empty list of {role, content} messages"),
    (_message_without_content, "prompt[0].content", "must be a string, got None"),
    (_no_user_message, "prompt", "must contain a message with role 'user'"),
]


@pytest.mark.parametrize("make_bad, field, expected", BAD_ROWS)
def test_malformed_jsonl_row_names_file_row_and_field(tmp_path, make_bad, field, expected):
    rows = [dapo_row("a", "1"), dapo_row("b", "2"), make_bad(), dapo_row("c", "3")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(MalformedRowError) as info:
        load_prompt_rows([path])
    msg = str(info.value)
    assert msg.startswith(f"{path} row 2 (line 3): field '{field}' {expected}"), msg
    assert info.value.row == 2 and info.value.field == field and info.value.path == path
    kept, stats = load_prompt_rows([path], skip_malformed=True)
    assert [r.ground_truth for r in kept] == ["1", "2", "3"]
    assert stats == {"rows_read": 4, "malformed_skipped": 1, "duplicates_dropped": 0}


@pytest.mark.parametrize(
    "make_bad, field, expected",
    [
        (_missing_reward_model, "reward_model", "is missing"),
        (_ground_truth_none, "reward_model.ground_truth", "must be a string, got None"),
        (_message_without_content, "prompt[0].content", "must be a string, got None"),
    ],
)
def test_malformed_parquet_row_names_file_row_and_field(tmp_path, make_bad, field, expected):
    rows = [dapo_row(f"p{i}", str(i)) for i in range(20)]
    rows[17] = make_bad()
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(MalformedRowError) as info:
        load_prompt_rows([path])
    assert str(info.value).startswith(f"{path} row 17: field '{field}' {expected}"), str(info.value)
    kept, stats = load_prompt_rows([path], skip_malformed=True)
    assert len(kept) == 19 and stats["malformed_skipped"] == 1 and stats["rows_read"] == 20


def test_bad_json_line_is_a_malformed_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row("a", "1"), '{"prompt": [', dapo_row("b", "2"), "[1, 2]"])
    with pytest.raises(MalformedRowError) as info:
        load_prompt_rows([path])
    assert str(info.value).startswith(
        f"{path} row 1 (line 2): field '<line>' must be one JSON object, got invalid JSON"
    )
    kept, stats = load_prompt_rows([path], skip_malformed=True)
    assert [r.ground_truth for r in kept] == ["1", "2"]
    assert stats == {"rows_read": 4, "malformed_skipped": 2, "duplicates_dropped": 0}
    # a JSON value that is not an object
    path2 = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(MalformedRowError, match=r"row 0 \(line 1\): field '<row>' must be an object"):
        load_prompt_rows([path2])


def test_missing_file_and_unknown_extension(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [dapo_row("a", "1")])
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="prompt file not found: .*nope.parquet"):
        load_prompt_rows([good, missing])
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"train.csv: unknown prompt file type; expected one of .parquet, .jsonl"):
        load_prompt_rows([str(csv)])


# ---------------------------------------------------------------------------------------------- tokenization


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>", "what", "is", "one", "plus", "two", "?"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok, {w: i for i, w in enumerate(words)}


def test_tokenize_with_chat_template_contains_prompt_and_generation_prompt(tmp_path):
    tok, vocab = _tiny_tokenizer()
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [dapo_row("what is one plus one ?", "2", templated=False), dapo_row("what is two ?", "2", templated=False)],
    )
    ds, _ = PromptDataset.from_files([path], template="none")
    ids = ds.tokenize(0, tok, apply_chat_template=True, max_prompt_len=100)
    assert ids == [vocab[w] for w in ["<|user|>", "what", "is", "one", "plus", "one", "?", "<|end|>", "<|assistant|>"]]
    plain = ds.tokenize(1, tok, apply_chat_template=False, max_prompt_len=100)
    assert plain == [vocab[w] for w in ["what", "is", "two", "?"]]
    with pytest.raises(PromptTooLongError, match=r"t.jsonl row 0 \(line 1\): prompt has 9 tokens, more than .*=8"):
        ds.tokenize(0, tok, apply_chat_template=True, max_prompt_len=8)


def test_filter_too_long_drops_and_reindexes(tmp_path):
    tok, _ = _tiny_tokenizer()
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            dapo_row("what is one plus one plus two ?", "4", templated=False),
            dapo_row("what is two ?", "2", templated=False),
            dapo_row("one ?", "1", templated=False),
        ],
    )
    ds, _ = PromptDataset.from_files([path], template="none")
    assert len(ds) == 3
    # chat-templated lengths: 11, 7, 5
    assert ds.filter_too_long(tok, 7) == 1
    assert len(ds) == 2
    assert [ds[i].ground_truth for i in range(len(ds))] == ["2", "1"]
    assert [ds[i].index for i in range(len(ds))] == [0, 1]
    assert len(ds.tokenize(0, tok, apply_chat_template=True, max_prompt_len=7)) == 7


# ---------------------------------------------------------------------------------------------- avg@k


def test_eval_avg_at_k_hand_case():
    keys = ["p1"] * 4 + ["p2"] * 4 + ["p3"] * 4
    acc = [True, False, True, True] + [False] * 4 + [True, False, False, False]
    out = eval_avg_at_k(acc, keys)
    assert out["avg_at_k"] == pytest.approx(4 / 12)
    assert out["per_problem"] == {"p1": 0.75, "p2": 0.0, "p3": 0.25}
    assert out["pass_at_k"] == pytest.approx(2 / 3)
    assert out["k"] == 4 and out["num_problems"] == 3 and out["num_rows"] == 12
    # AIME layout: 30 problems x 32 copies -> avg@32 is the mean over rows
    keys = [f"q{i}" for i in range(30) for _ in range(32)]
    acc = [(i % 32) < (i // 32) for i in range(960)]  # problem q_j solved by j of 32 copies
    out = eval_avg_at_k(acc, keys)
    assert out["k"] == 32 and out["avg_at_k"] == pytest.approx(sum(range(30)) / 960)
    assert out["per_problem"]["q8"] == pytest.approx(8 / 32)
    assert eval_avg_at_k([True, False, True], ["a", "a", "b"])["k"] is None
    with pytest.raises(ValueError, match="3 accuracies for 2 problem keys"):
        eval_avg_at_k([True, False, True], ["a", "b"])

"""Prompt datasets in the DAPO-Math-17k schema (parquet or jsonl).

Schema of one row (the released DAPO-Math-17k and AIME-2024 files)::

    data_source:  str                          e.g. "math_dapo" (optional here; "" when absent)
    prompt:       list of {role: str, content: str}, with at least one "user" message
    ability:      str                          (not used by training)
    reward_model: {ground_truth: str, style: str}
    extra_info:   {index: int}                 (not used by training)

Parquet files are read one record batch at a time with pyarrow (no pandas), so the 1.7 M-row
DAPO-Math-17k file is never converted as a whole. jsonl files hold one JSON object per line; blank
lines are ignored and a line that is not a JSON object is a malformed row.

Row numbers in messages count data rows from 0 in each file (for jsonl, the 1-based line number is
given as well). A malformed row raises :class:`MalformedRowError` unless ``skip_malformed`` is set,
in which case it is counted in the ``malformed_skipped`` statistic and left out.

The prompt template (``data.template``) is applied to the *last* user message of each row; see
:mod:`dapo_megatron.data.template`. ``PromptRow.problem_key`` is that message's content after
templating, so deduplication treats a raw problem and its templated form as the same problem.

Tokenizers are passed in by the caller (anything with ``apply_chat_template`` / ``encode`` in the
``transformers`` style); this module never imports ``transformers`` or ``tokenizers``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dapo_megatron.data.template import TEMPLATES, apply_template

PARQUET_EXTENSIONS = (".parquet",)
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
_PARQUET_BATCH_ROWS = 8192


class MalformedRowError(ValueError):
    """A row does not follow the schema.

    The message reads ``"<file> row <n>: field '<field>' <what was expected>, got <what was found>"``.
    ``path``, ``row`` (0-based data row in the file) and ``field`` are kept as attributes.
    """

    def __init__(self, path: str, row: int, field: str, message: str, line: Optional[int] = None):
        where = f"{path} row {row}" + (f" (line {line})" if line is not None else "")
        super().__init__(f"{where}: field '{field}' {message}")
        self.path = path
        self.row = row
        self.field = field
        self.line = line


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt.

    ``index`` is the row's position in the list returned by :func:`load_prompt_rows` (after
    skipping and deduplication), which is also its index in :class:`PromptDataset` -- the value to
    use as ``Group.prompt_index``. ``messages`` are ``{"role", "content"}`` dicts with the template
    applied to the last user message; ``problem_key`` is that message's content.
    """

    index: int
    messages: Tuple[Dict[str, str], ...]
    ground_truth: str
    data_source: str
    problem_key: str


def _describe(value: object) -> str:
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ---------------------------------------------------------------------------------------------
# Reading raw records
# ---------------------------------------------------------------------------------------------


def _file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    allowed = ", ".join(PARQUET_EXTENSIONS + JSONL_EXTENSIONS)
    raise ValueError(f"{path}: unknown prompt file type; expected one of {allowed}")


def _check_file(path: str) -> str:
    kind = _file_kind(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"prompt file is not a regular file: {path}")
    return kind


def iter_raw_records(path: str) -> Iterator[Tuple[int, Optional[int], Any]]:
    """Yield ``(row, line, record)`` for each data row of one file, streaming.

    ``line`` is the 1-based line number for jsonl and ``None`` for parquet. ``record`` is the
    row as a dict, or for a jsonl line that is not valid JSON a :class:`MalformedRowError`
    (yielded, not raised, so the caller decides whether to skip it).
    """
    path = os.fspath(path)
    kind = _check_file(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for item in batch.to_pylist():
                yield row, None, item
                row += 1
        return
    row = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record: Any
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = MalformedRowError(
                    path, row, "<line>", f"must be one JSON object, got invalid JSON ({exc})", line_no
                )
            yield row, line_no, record
            row += 1


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def parse_record(record: Any, *, path: str, row: int, line: Optional[int] = None, template: str = "dapo") -> PromptRow:
    """Validate one raw record and build its :class:`PromptRow` (with ``index=-1``).

    Raises :class:`MalformedRowError` naming the file, row and field on the first problem found.
    """

    def bad(field: str, message: str) -> MalformedRowError:
        return MalformedRowError(path, row, field, message, line)

    if isinstance(record, MalformedRowError):
        raise record
    if not isinstance(record, dict):
        raise bad("<row>", f"must be an object with the DAPO schema, got {_describe(record)}")

    if "prompt" not in record:
        raise bad("prompt", "is missing; expected a list of {role, content} messages")
    prompt = record["prompt"]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise bad("prompt", f"must be a non-empty list of {{role, content}} messages, got {_describe(prompt)}")
    messages: List[Dict[str, str]] = []
    for j, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise bad(f"prompt[{j}]", f"must be a {{role, content}} message, got {_describe(msg)}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise bad(f"prompt[{j}].{key}", f"must be a string, got {_describe(msg.get(key))}")
        messages.append({"role": msg["role"], "content": msg["content"]})
    user = [j for j, m in enumerate(messages) if m["role"] == "user"]
    if not user:
        raise bad(
            "prompt", "must contain a message with role 'user', found roles " + repr([m["role"] for m in messages])
        )

    if "reward_model" not in record or record["reward_model"] is None:
        raise bad("reward_model", "is missing; expected {ground_truth: str, style: str}")
    reward_model = record["reward_model"]
    if not isinstance(reward_model, dict):
        raise bad("reward_model", f"must be {{ground_truth: str, style: str}}, got {_describe(reward_model)}")
    ground_truth = reward_model.get("ground_truth")
    if not isinstance(ground_truth, str):
        raise bad("reward_model.ground_truth", f"must be a string, got {_describe(ground_truth)}")

    data_source = record.get("data_source", "")
    if data_source is None:
        data_source = ""
    if not isinstance(data_source, str):
        raise bad("data_source", f"must be a string, got {_describe(data_source)}")

    last = user[-1]
    content = apply_template(messages[last]["content"], template)
    messages[last] = {"role": "user", "content": content}
    return PromptRow(
        index=-1,
        messages=tuple(messages),
        ground_truth=ground_truth,
        data_source=data_source,
        problem_key=content,
    )


def iter_prompt_records(
    files: Sequence[str], *, template: str = "dapo", skip_malformed: bool = False, stats: Optional[dict] = None
) -> Iterator[Tuple[PromptRow, Dict[str, Any]]]:
    """Yield ``(row, raw record)`` for every valid row of ``files`` in order (no dedup, ``index=-1``).

    ``stats`` (if given) gets ``rows_read`` and ``malformed_skipped`` incremented. Every file is
    checked (exists, known type) before the first row is read.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; allowed values are {', '.join(map(repr, TEMPLATES))}")
    if isinstance(files, (str, bytes, os.PathLike)):
        files = [os.fsdecode(files)]
    paths = [os.fspath(f) for f in files]
    for p in paths:
        _check_file(p)
    counts = stats if stats is not None else {}
    counts.setdefault("rows_read", 0)
    counts.setdefault("malformed_skipped", 0)
    for path in paths:
        for row, line, record in iter_raw_records(path):
            counts["rows_read"] += 1
            try:
                parsed = parse_record(record, path=path, row=row, line=line, template=template)
            except MalformedRowError:
                if not skip_malformed:
                    raise
                counts["malformed_skipped"] += 1
                continue
            yield parsed, record


def load_prompt_rows(
    files: Sequence[str], *, dedup: bool = False, template: str = "dapo", skip_malformed: bool = False
) -> Tuple[List[PromptRow], dict]:
    """Read and validate prompt rows from parquet / jsonl ``files``.

    Returns ``(rows, stats)`` with ``stats = {"rows_read", "malformed_skipped",
    "duplicates_dropped"}``. ``dedup`` keeps the first row of each ``problem_key`` (across all
    files). ``rows[i].index == i``.

    Raises ``FileNotFoundError`` (missing file), ``ValueError`` (unknown extension or template) and
    :class:`MalformedRowError` (a bad row, unless ``skip_malformed``).
    """
    stats: dict = {"rows_read": 0, "malformed_skipped": 0, "duplicates_dropped": 0}
    seen: set = set()
    rows: List[PromptRow] = []
    for parsed, _ in iter_prompt_records(files, template=template, skip_malformed=skip_malformed, stats=stats):
        if dedup:
            if parsed.problem_key in seen:
                stats["duplicates_dropped"] += 1
                continue
            seen.add(parsed.problem_key)
        rows.append(replace(parsed, index=len(rows)))
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Dataset and tokenization
# ---------------------------------------------------------------------------------------------


class PromptTooLongError(ValueError):
    """A tokenized prompt exceeds ``max_prompt_len``; the message names the row."""


def _ids_of(encoded: Any) -> List[int]:
    """Token ids from whatever a tokenizer returned (list, BatchEncoding/dict, tokenizers.Encoding)."""
    if isinstance(encoded, dict) or (hasattr(encoded, "keys") and "input_ids" in encoded):
        encoded = encoded["input_ids"]
    elif hasattr(encoded, "ids"):
        encoded = encoded.ids
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        if len(ids) != 1:
            raise ValueError(f"tokenizer returned a batch of {len(ids)} sequences for one prompt")
        ids = list(ids[0])
    return [int(t) for t in ids]


class PromptDataset:
    """A list of :class:`PromptRow` with tokenization helpers.

    ``dataset[i]`` is a :class:`PromptRow` with ``index == i``. Token ids are cached per row for the
    most recently used tokenizer, so :meth:`filter_too_long` followed by :meth:`tokenize` encodes
    each prompt once.
    """

    def __init__(self, rows: Sequence[PromptRow]):
        self._rows: List[PromptRow] = [r if r.index == i else replace(r, index=i) for i, r in enumerate(rows)]
        self._cache: Dict[Tuple[int, bool], List[int]] = {}
        self._cache_tokenizer: Any = None

    @classmethod
    def from_files(
        cls, files: Sequence[str], *, dedup: bool = False, template: str = "dapo", skip_malformed: bool = False
    ) -> Tuple[PromptDataset, dict]:
        """:func:`load_prompt_rows` wrapped in a dataset; returns ``(dataset, stats)``."""
        rows, stats = load_prompt_rows(files, dedup=dedup, template=template, skip_malformed=skip_malformed)
        return cls(rows), stats

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> PromptRow:
        return self._rows[i]

    @property
    def rows(self) -> List[PromptRow]:
        return list(self._rows)

    def prompt_text(self, i: int) -> str:
        """The prompt without a chat template: the message contents joined by blank lines."""
        return "\n\n".join(m["content"] for m in self._rows[i].messages)

    def _encode(self, i: int, tokenizer: Any, apply_chat_template: bool) -> List[int]:
        if tokenizer is not self._cache_tokenizer:
            self._cache = {}
            self._cache_tokenizer = tokenizer
        key = (i, apply_chat_template)
        ids = self._cache.get(key)
        if ids is None:
            if apply_chat_template:
                out = tokenizer.apply_chat_template(
                    [dict(m) for m in self._rows[i].messages], add_generation_prompt=True, tokenize=True
                )
            else:
                out = tokenizer.encode(self.prompt_text(i))
            ids = _ids_of(out)
            self._cache[key] = ids
        return ids

    def tokenize(
        self, i: int, tokenizer: Any, *, apply_chat_template: bool = True, max_prompt_len: int = 0
    ) -> List[int]:
        """Prompt token ids of row ``i``.

        With ``apply_chat_template`` the messages go through
        ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``;
        without it the :meth:`prompt_text` is encoded with ``tokenizer.encode`` (which adds the
        tokenizer's default special tokens, e.g. a BOS). ``max_prompt_len > 0`` bounds the length:
        a longer prompt raises :class:`PromptTooLongError` naming the row (use
        :meth:`filter_too_long` first to drop such rows instead).
        """
        ids = self._encode(i, tokenizer, apply_chat_template)
        if max_prompt_len > 0 and len(ids) > max_prompt_len:
            row = self._rows[i]
            raise PromptTooLongError(
                f"prompt row {i} ({row.data_source or 'unknown source'}) has {len(ids)} tokens, more than "
                f"max_prompt_len={max_prompt_len}; raise the limit or drop long rows with filter_too_long()"
            )
        return list(ids)

    def filter_too_long(self, tokenizer: Any, max_len: int, *, apply_chat_template: bool = True) -> int:
        """Drop rows whose tokenized prompt is longer than ``max_len``; return how many were dropped.

        The kept rows are re-indexed (``dataset[i].index == i`` still holds).
        """
        if max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {max_len}")
        keep: List[int] = []
        for i in range(len(self._rows)):
            if len(self._encode(i, tokenizer, apply_chat_template)) <= max_len:
                keep.append(i)
        dropped = len(self._rows) - len(keep)
        if dropped:
            old_cache = self._cache
            self._rows = [replace(self._rows[old], index=new) for new, old in enumerate(keep)]
            self._cache = {}
            for new, old in enumerate(keep):
                if (old, apply_chat_template) in old_cache:
                    self._cache[(new, apply_chat_template)] = old_cache[(old, apply_chat_template)]
        return dropped


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def eval_avg_at_k(acc_per_row: Sequence[bool], problem_keys: Sequence[str]) -> dict:
    """Accuracy of an evaluation set whose problems appear ``k`` times each.

    Returns a dict:

    * ``avg_at_k``: mean accuracy over all rows. For AIME-2024 (30 problems x 32 copies) this is
      avg@32, the paper's metric.
    * ``pass_at_k``: fraction of problems with at least one correct row.
    * ``per_problem``: ``{problem_key: mean accuracy}``, in first-appearance order.
    * ``k``: copies per problem when every problem has the same count, else ``None``.
    * ``num_problems``, ``num_rows``.
    """
    if len(acc_per_row) != len(problem_keys):
        raise ValueError(f"eval_avg_at_k: {len(acc_per_row)} accuracies for {len(problem_keys)} problem keys")
    if len(acc_per_row) == 0:
        raise ValueError("eval_avg_at_k: no rows")
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for acc, key in zip(acc_per_row, problem_keys):
        sums[key] = sums.get(key, 0.0) + (1.0 if acc else 0.0)
        counts[key] = counts.get(key, 0) + 1
    per_problem = {key: sums[key] / counts[key] for key in sums}
    sizes = set(counts.values())
    return {
        "avg_at_k": sum(1.0 for a in acc_per_row if a) / len(acc_per_row),
        "pass_at_k": sum(1.0 for v in sums.values() if v > 0) / len(sums),
        "per_problem": per_problem,
        "k": sizes.pop() if len(sizes) == 1 else None,
        "num_problems": len(sums),
        "num_rows": len(acc_per_row),
    }

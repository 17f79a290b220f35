"""Prompt datasets in the DAPO-Math-17k schema (parquet or jsonl).

Schema of one row (the released DAPO-Math-17k and AIME-2024 files)::

    data_source:  str                          e.g. "math_dapo" (optional here; "" when absent)
    prompt:       list of {role: str, content: str}, with at least one "user" message
    ability:      str                          (not used by training)
    reward_model: {ground_truth: str, style: str}
    extra_info:   {index: int}                 (not used by training)

Files are read by :mod:`dapo_megatron.data.readers` (parquet one record batch at a time, jsonl line
by line; blank lines are ignored and a line that is not UTF-8 JSON is a malformed row).

Row numbers in messages count data rows from 0 in each file (for jsonl, the 1-based line number is
given as well). A malformed row raises :class:`MalformedRowError` unless ``skip_malformed`` is set,
in which case it is counted in the ``malformed_skipped`` statistic and left out. Load-time bounds
are malformed rows too: a blank problem (it would reach generation as a prompt of no tokens) and,
given ``max_prompt_len``, a prompt too long in characters to fit (refused before tokenizing).
Every error names the file, row and the setting that fixes it (:mod:`dapo_megatron.data.errors`);
a load never returns an empty dataset.

The prompt template (``data.template``) is applied to the *last* user message of each row; see
:mod:`dapo_megatron.data.template`. ``PromptRow.problem_key`` is that message's content after
templating, so deduplication treats a raw problem and its templated form as the same problem.

Tokenizers are passed in by the caller (anything with ``apply_chat_template`` / ``encode`` in the
``transformers`` style); this module never imports ``transformers`` or ``tokenizers``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from dapo_megatron.data.errors import (
    TRAIN_ORIGIN,
    DataOrigin,
    EmptyDatasetError,
    EmptyPromptError,
    MalformedRowError,
    PromptTooLongError,
    row_where,
)
from dapo_megatron.data.readers import check_file, iter_raw_records
from dapo_megatron.data.template import TEMPLATES, apply_template

#: Prompts longer than ``max_prompt_len * CHARS_PER_TOKEN_BOUND`` characters are refused before
#: tokenizing (tokenizing a 5 MB prompt took 21 s only to refuse it). Natural-language and LaTeX
#: prompts average 3-5 characters per token, so a prompt over this bound cannot fit in
#: ``max_prompt_len`` tokens unless nearly every token spans 32+ characters.
CHARS_PER_TOKEN_BOUND = 32


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt.

    ``index`` is the row's position in the list returned by :func:`load_prompt_rows` (after
    skipping and deduplication), which is also its index in :class:`PromptDataset` -- the value to
    use as ``Group.prompt_index``. ``messages`` are ``{"role", "content"}`` dicts with the template
    applied to the last user message; ``problem_key`` is that message's content, never blank.
    ``source_path``, ``source_row`` and ``source_line`` say where the row was read (for errors
    found later, e.g. at tokenization); ``""`` / ``-1`` / ``None`` when not read from a file.
    """

    index: int
    messages: Tuple[Dict[str, str], ...]
    ground_truth: str
    data_source: str
    problem_key: str
    source_path: str = ""
    source_row: int = -1
    source_line: Optional[int] = None

    def where(self) -> str:
        """``"<file> row <n> (line <l>)"``, or ``"prompt row <index>"`` for a row not read from a file."""
        if not self.source_path:
            return f"prompt row {self.index}"
        return row_where(self.source_path, self.source_row, self.source_line)


def _describe(value: object) -> str:
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class _Bad:
    """Builds the :class:`MalformedRowError` of one row (where it is, the field, what is wrong)."""

    def __init__(self, path: str, row: int, line: Optional[int]):
        self.path, self.row, self.line = path, row, line

    def __call__(self, field: str, message: str) -> MalformedRowError:
        return MalformedRowError(self.path, self.row, field, message, self.line)


def _parse_messages(record: dict, bad: _Bad) -> Tuple[List[Dict[str, str]], int]:
    """The ``{role, content}`` messages and the index of the last user message (the problem)."""
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
    # a blank problem is refused here, by file and row: left in, it reached generation as a prompt
    # of zero tokens (without the DAPO template and chat template) and stopped the run mid-training
    if not messages[user[-1]]["content"].strip():
        raise bad(f"prompt[{user[-1]}].content", "must not be empty: it is the problem the model answers, got "
                  + _describe(messages[user[-1]]["content"]))  # fmt: skip
    return messages, user[-1]


def _parse_reward_fields(record: dict, bad: _Bad) -> Tuple[str, str]:
    """``(ground_truth, data_source)`` of a row."""
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
    return ground_truth, data_source


def _check_prompt_chars(messages: List[Dict[str, str]], max_prompt_len: int, origin: DataOrigin, bad: _Bad) -> None:
    """Refuse a prompt that cannot fit in ``max_prompt_len`` tokens, by its length in characters."""
    if max_prompt_len <= 0:
        return
    chars = sum(len(m["content"]) for m in messages)
    bound = max_prompt_len * CHARS_PER_TOKEN_BOUND
    if chars > bound:
        key = origin.length_key or "max_prompt_len"
        raise bad("prompt", f"has {chars} characters, more than the {bound} allowed by {key}={max_prompt_len} "
                  f"({CHARS_PER_TOKEN_BOUND} characters per token at most; checked before tokenizing). "
                  f"Raise {key} to allow longer prompts")  # fmt: skip


def parse_record(
    record: Any,
    *,
    path: str,
    row: int,
    line: Optional[int] = None,
    template: str = "dapo",
    max_prompt_len: int = 0,
    origin: DataOrigin = TRAIN_ORIGIN,
) -> PromptRow:
    """Validate one raw record and build its :class:`PromptRow` (with ``index=-1``).

    Raises :class:`MalformedRowError` naming the file, row and field on the first problem found
    (without a fix: :func:`iter_prompt_records` adds the one its caller can apply).
    ``max_prompt_len > 0`` also refuses a prompt of more than ``max_prompt_len *``
    :data:`CHARS_PER_TOKEN_BOUND` characters.
    """
    bad = _Bad(path, row, line)
    if isinstance(record, MalformedRowError):
        raise record
    if not isinstance(record, dict):
        raise bad("<row>", f"must be an object with the DAPO schema, got {_describe(record)}")
    messages, last = _parse_messages(record, bad)
    ground_truth, data_source = _parse_reward_fields(record, bad)
    content = apply_template(messages[last]["content"], template)
    messages[last] = {"role": "user", "content": content}
    _check_prompt_chars(messages, max_prompt_len, origin, bad)
    return PromptRow(
        index=-1,
        messages=tuple(messages),
        ground_truth=ground_truth,
        data_source=data_source,
        problem_key=content,
        source_path=path,
        source_row=row,
        source_line=line,
    )


def _file_list(files: Sequence[str]) -> List[str]:
    if isinstance(files, (str, bytes, os.PathLike)):
        files = [os.fsdecode(files)]
    return [os.fspath(f) for f in files]


def iter_prompt_records(
    files: Sequence[str],
    *,
    template: str = "dapo",
    skip_malformed: bool = False,
    stats: Optional[dict] = None,
    max_prompt_len: int = 0,
    origin: DataOrigin = TRAIN_ORIGIN,
) -> Iterator[Tuple[PromptRow, Dict[str, Any]]]:
    """Yield ``(row, raw record)`` for every valid row of ``files`` in order (no dedup, ``index=-1``).

    ``stats`` (if given) gets ``rows_read`` and ``malformed_skipped`` incremented. Every file is
    checked (exists, known type, parquet footer readable) before the first row is read. A bad row
    raises :class:`MalformedRowError` ending with the fix named by ``origin``, unless
    ``skip_malformed``; a bad file always raises (see :mod:`dapo_megatron.data.readers`).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; allowed values are {', '.join(map(repr, TEMPLATES))}")
    paths = _file_list(files)
    for p in paths:
        check_file(p, origin)
    counts = stats if stats is not None else {}
    counts.setdefault("rows_read", 0)
    counts.setdefault("malformed_skipped", 0)
    for path in paths:
        for row, line, record in iter_raw_records(path, origin):
            counts["rows_read"] += 1
            try:
                parsed = parse_record(record, path=path, row=row, line=line, template=template,
                                      max_prompt_len=max_prompt_len, origin=origin)  # fmt: skip
            except MalformedRowError as exc:
                if not skip_malformed:
                    raise exc.with_fix(origin.row_fix()) from None
                counts["malformed_skipped"] += 1
                continue
            yield parsed, record


def empty_dataset_error(paths: Sequence[str], stats: dict, origin: DataOrigin, why: str = "") -> EmptyDatasetError:
    """The error for files that left no usable row, with the counts that say why."""
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items())
    return EmptyDatasetError(
        f"{origin.files_key}: no usable prompt rows in {', '.join(paths)} ({counts}){why}; "
        f"give {origin.files_key} at least one valid row"
    )


def first_of_each_problem(records: Iterable[Tuple[PromptRow, Any]], stats: dict) -> Iterator[Tuple[PromptRow, Any]]:
    """The ``(row, raw)`` pairs whose ``problem_key`` was not seen before; each dropped one adds 1 to
    ``stats["duplicates_dropped"]``. Streams: memory grows with distinct keys, not rows."""
    seen: set = set()
    for row, raw in records:
        if row.problem_key in seen:
            stats["duplicates_dropped"] += 1
            continue
        seen.add(row.problem_key)
        yield row, raw


def load_prompt_rows(
    files: Sequence[str],
    *,
    dedup: bool = False,
    template: str = "dapo",
    skip_malformed: bool = False,
    max_prompt_len: int = 0,
    origin: DataOrigin = TRAIN_ORIGIN,
) -> Tuple[List[PromptRow], dict]:
    """Read and validate prompt rows from parquet / jsonl ``files``; never returns an empty list.

    Returns ``(rows, stats)`` with ``stats = {"rows_read", "malformed_skipped",
    "duplicates_dropped"}``. ``dedup`` keeps the first row of each ``problem_key`` (across all
    files). ``rows[i].index == i``. ``max_prompt_len`` bounds prompts by characters (see
    :func:`parse_record`); ``origin`` names the settings quoted in errors.

    Raises ``FileNotFoundError`` (missing file), ``ValueError`` (unknown template),
    :class:`DataFileError` (unknown type, unreadable or empty file), :class:`MalformedRowError` (a
    bad row, unless ``skip_malformed``) and :class:`EmptyDatasetError` (no row left).
    """
    stats: dict = {"rows_read": 0, "malformed_skipped": 0, "duplicates_dropped": 0}
    rows: List[PromptRow] = []
    records = iter_prompt_records(files, template=template, skip_malformed=skip_malformed, stats=stats,
                                  max_prompt_len=max_prompt_len, origin=origin)  # fmt: skip
    for parsed, _ in first_of_each_problem(records, stats) if dedup else records:
        rows.append(replace(parsed, index=len(rows)))
    if not rows:
        raise empty_dataset_error(_file_list(files), stats, origin)
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Dataset and tokenization
# ---------------------------------------------------------------------------------------------


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

    def __init__(self, rows: Sequence[PromptRow], *, origin: DataOrigin = TRAIN_ORIGIN):
        self._rows: List[PromptRow] = [r if r.index == i else replace(r, index=i) for i, r in enumerate(rows)]
        self._cache: Dict[Tuple[int, bool], List[int]] = {}
        self._cache_tokenizer: Any = None
        self.origin = origin  # names the settings quoted by tokenization errors

    @classmethod
    def from_files(
        cls,
        files: Sequence[str],
        *,
        dedup: bool = False,
        template: str = "dapo",
        skip_malformed: bool = False,
        max_prompt_len: int = 0,
        origin: DataOrigin = TRAIN_ORIGIN,
    ) -> Tuple[PromptDataset, dict]:
        """:func:`load_prompt_rows` wrapped in a dataset (never empty); returns ``(dataset, stats)``."""
        rows, stats = load_prompt_rows(files, dedup=dedup, template=template, skip_malformed=skip_malformed,
                                       max_prompt_len=max_prompt_len, origin=origin)  # fmt: skip
        return cls(rows, origin=origin), stats

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
        """Prompt token ids of row ``i`` (never empty).

        With ``apply_chat_template`` the messages go through
        ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``;
        without it the :meth:`prompt_text` is encoded with ``tokenizer.encode`` (which adds the
        tokenizer's default special tokens, e.g. a BOS). ``max_prompt_len > 0`` bounds the length:
        a longer prompt raises :class:`PromptTooLongError`, and one of no tokens
        :class:`EmptyPromptError`, each naming the file, row and the setting that fixes it.
        """
        ids = self._encode(i, tokenizer, apply_chat_template)
        row, origin = self._rows[i], self.origin
        if not ids:
            raise EmptyPromptError(f"{row.where()}: prompt has no tokens after tokenization (generation needs at "
                                   f"least one); {origin.row_fix('such rows')}")  # fmt: skip
        if max_prompt_len > 0 and len(ids) > max_prompt_len:
            key = origin.length_key or "max_prompt_len"
            raise PromptTooLongError(f"{row.where()}: prompt has {len(ids)} tokens, more than {key}={max_prompt_len}; "
                                     f"raise {key}, or {origin.row_fix('over-long rows')}")  # fmt: skip
        return list(ids)

    def filter_too_long(self, tokenizer: Any, max_len: int, *, apply_chat_template: bool = True) -> int:
        """Drop rows whose tokenized prompt is longer than ``max_len``; return how many were dropped.

        The kept rows are re-indexed (``dataset[i].index == i`` still holds). A non-empty dataset is
        never emptied: when every row is too long, :class:`EmptyDatasetError` is raised and the
        dataset is left as it was.
        """
        if max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {max_len}")
        keep = [i for i in range(len(self._rows)) if len(self._encode(i, tokenizer, apply_chat_template)) <= max_len]
        dropped = len(self._rows) - len(keep)
        if self._rows and not keep:
            key = self.origin.length_key or "max_prompt_len"
            paths = sorted({r.source_path for r in self._rows if r.source_path})
            raise empty_dataset_error(paths, {"rows_over_the_limit": dropped}, self.origin,
                                      f": every prompt is longer than {key}={max_len} tokens; raise {key}")  # fmt: skip
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

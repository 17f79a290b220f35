"""Raw records of prompt files (parquet or jsonl), streamed, with every read failure named.

Invariants:

* Rows are numbered from 0 per file, counting every data row (for jsonl: every non-blank line, valid
  or not), so a row number in a message is the same with and without ``skip_malformed``.
* A problem confined to one row (a jsonl line that is not UTF-8 or not JSON) is *yielded* as a
  :class:`MalformedRowError`, so the caller can skip it; a problem with the file as a whole (missing,
  unknown type, not parquet, truncated, corrupt, no data rows) is *raised* as a ``FileNotFoundError``
  or :class:`DataFileError`, never skipped -- a half-read file would silently change the dataset.
* Parquet is read one record batch at a time with pyarrow (no pandas), so the 1.7 M-row
  DAPO-Math-17k file is never converted as a whole; jsonl is read line by line as bytes, so a
  bad byte spoils one line, not the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional, Tuple

from dapo_megatron.data.errors import TRAIN_ORIGIN, DataFileError, DataOrigin, MalformedRowError

PARQUET_EXTENSIONS = (".parquet",)
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
_PARQUET_BATCH_ROWS = 8192
_UTF8_BOM = b"\xef\xbb\xbf"

RawRecord = Tuple[int, Optional[int], Any]


def file_kind(path: str, origin: DataOrigin = TRAIN_ORIGIN) -> str:
    """``"parquet"`` or ``"jsonl"`` from the file name; any other name is a :class:`DataFileError`."""
    lower = path.lower()
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    allowed = ", ".join(PARQUET_EXTENSIONS + JSONL_EXTENSIONS)
    raise DataFileError(path, f"unknown prompt file type; expected one of {allowed}",
                        f"convert it or remove it from {origin.files_key}")  # fmt: skip


def check_file(path: str, origin: DataOrigin = TRAIN_ORIGIN) -> str:
    """Check that ``path`` can be read before any row is: a regular file of a known type, and for
    parquet a readable footer (a zero-byte or truncated file fails here, naming the file)."""
    kind = file_kind(path, origin)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path} (listed in {origin.files_key})")
    if not os.path.isfile(path):
        raise DataFileError(path, "is not a regular file", f"give a parquet/jsonl file in {origin.files_key}")
    if kind == "parquet":
        _open_parquet(path, origin)
    return kind


def _arrow_errors() -> tuple:
    import pyarrow as pa

    # pyarrow reports a bad footer as ArrowInvalid and bad compressed pages as plain OSError
    return (pa.ArrowException, OSError)


def _open_parquet(path: str, origin: DataOrigin) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except _arrow_errors() as exc:
        size = os.path.getsize(path)
        raise DataFileError(path, f"not a readable parquet file ({size} bytes; pyarrow: {exc})",
                            origin.file_fix()) from None  # fmt: skip


def _iter_parquet(path: str, origin: DataOrigin) -> Iterator[RawRecord]:
    pf = _open_parquet(path, origin)
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS)
    row = 0
    while True:
        # only pyarrow's own calls are guarded: an error raised by the consumer at ``yield``
        # must not be reported as a corrupt file
        try:
            batch = next(batches, None)
            items = [] if batch is None else batch.to_pylist()
        except _arrow_errors() as exc:
            raise DataFileError(path, f"corrupt parquet data after row {row} (pyarrow: {exc})",
                                origin.file_fix(), row=row) from None  # fmt: skip
        if batch is None:
            return
        for item in items:
            yield row, None, item
            row += 1


def _decode_line(raw: bytes, path: str, row: int, line_no: int) -> Any:
    """The JSON value of one jsonl line, or the :class:`MalformedRowError` describing why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1]
        return MalformedRowError(path, row, "<line>", f"must be UTF-8 text, got byte {bad!r} at byte {exc.start}",
                                 line_no)  # fmt: skip
    try:
        return json.loads(text)
    except RecursionError:
        return MalformedRowError(path, row, "<line>", "must be one JSON object, got JSON nested too deeply to parse",
                                 line_no)  # fmt: skip
    except ValueError as exc:  # JSONDecodeError, and int strings over Python's digit limit
        return MalformedRowError(path, row, "<line>", f"must be one JSON object, got invalid JSON ({exc})", line_no)


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    row = 0
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]  # editors on some systems write one; it is not data
            if not raw.strip():
                continue
            yield row, line_no, _decode_line(raw, path, row, line_no)
            row += 1


def iter_raw_records(path: str, origin: DataOrigin = TRAIN_ORIGIN) -> Iterator[RawRecord]:
    """Yield ``(row, line, record)`` for each data row of one file, streaming.

    ``line`` is the 1-based line number for jsonl and ``None`` for parquet. ``record`` is the row
    as read (a dict for a well-formed row), or for a jsonl line that is not UTF-8 or not JSON a
    :class:`MalformedRowError` (yielded, not raised, so the caller decides whether to skip it).
    A file with no data row at all raises :class:`DataFileError` once it has been read.
    """
    path = os.fspath(path)
    kind = check_file(path, origin)
    rows = 0
    for item in _iter_parquet(path, origin) if kind == "parquet" else _iter_jsonl(path):
        rows += 1
        yield item
    if rows == 0:
        raise DataFileError(path, "no data rows", f"remove it from {origin.files_key} or give a file with rows")

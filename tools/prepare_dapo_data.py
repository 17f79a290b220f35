#!/usr/bin/env python
"""Validate (and optionally deduplicate) DAPO-Math-17k / AIME-2024 prompt files into one clean parquet.

    python tools/prepare_dapo_data.py dapo-math-17k.parquet -o data/dapo17k_dedup.parquet --dedup
    python tools/prepare_dapo_data.py aime-2024.parquet -o data/aime24.parquet

Inputs are local parquet or jsonl files in the DAPO schema (``data_source``, ``prompt`` as a list of
``{role, content}``, ``ability``, ``reward_model = {ground_truth, style}``, ``extra_info = {index}``);
nothing is downloaded. Every row is validated with the trainer's own loader
(:mod:`dapo_megatron.data.dataset`), so a file this tool accepts is one training accepts.

* A malformed row stops the tool with a message naming the file, row and field, unless
  ``--skip-malformed`` is given, in which case it is counted and left out. A file that cannot be
  read as a whole (corrupt or truncated parquet, no data rows) always stops it.
* The output may not be one of the inputs (compared after resolving links), and a run that would
  write no row at all is refused: neither replaces a file with an empty or different one.
* ``--dedup`` keeps the first row of each distinct problem (the released DAPO-Math-17k repeats each
  of its ~17k prompts about 100 times). Do not dedup AIME-2024: its 32 copies per problem are
  what makes the mean accuracy avg@32.
* ``--template none`` (default) writes the prompt content as read; ``--template dapo`` writes it
  wrapped in the DAPO template (content that already is templated is kept).

The output has the same schema. ``ability`` and ``reward_model.style`` are copied when they are
strings (else ``""`` and ``"rule"``); ``extra_info.index`` is copied when it is an integer, else it
is the row's position in the output. The output is written to a temporary file next to it and
renamed into place only when complete, so a failure never leaves a partial or stale-looking output.
A single summary line goes to stdout. Exit status: 0 written; 2 the input or arguments were refused
(one line on stderr naming the file, row and flag); 1 writing failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_megatron.data.dataset import (  # noqa: E402
    PromptRow,
    empty_dataset_error,
    first_of_each_problem,
    iter_prompt_records,
)
from dapo_megatron.data.errors import DataError, DataOrigin  # noqa: E402

# errors quote this tool's inputs and flag, not the trainer's config keys
TOOL_ORIGIN = DataOrigin(files_key="the input files", skip_setting="pass --skip-malformed", length_key=None)


class Refused(Exception):
    """The arguments cannot be honoured without losing data; nothing was written."""


_WRITE_ROWS = 8192


def _schema() -> Any:
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(message)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
            ("extra_info", pa.struct([("index", pa.int64())])),
        ]
    )


def _out_record(row: PromptRow, raw: Dict[str, Any], position: int) -> Dict[str, Any]:
    ability = raw.get("ability")
    style = (raw.get("reward_model") or {}).get("style")
    extra = raw.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    if isinstance(index, bool) or not isinstance(index, int):
        index = position
    return {
        "data_source": row.data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in row.messages],
        "ability": ability if isinstance(ability, str) else "",
        "reward_model": {"ground_truth": row.ground_truth, "style": style if isinstance(style, str) else "rule"},
        "extra_info": {"index": index},
    }


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: equal after resolving links, ``.``/``..`` and
    relative parts, or (both existing) the same inode, which also catches hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist: they cannot be the same file
        return False


def check_output(inputs: List[str], output: str) -> None:
    """Refuse an output that would replace one of the inputs, or that is a folder."""
    for path in inputs:
        if same_file(path, output):
            raise Refused(f"-o/--output {output} is also an input ({path}); writing it would replace "
                          "the input: give another output path")  # fmt: skip
    if os.path.isdir(output):
        raise Refused(f"-o/--output {output} is a folder; give a .parquet file path")


def _write_rows(writer: Any, schema: Any, records: Any, stats: dict, dedup: bool) -> None:
    """Stream validated rows into ``writer`` in chunks of ``_WRITE_ROWS`` (dedup by problem key)."""
    import pyarrow as pa

    pending: List[Dict[str, Any]] = []
    for row, raw in first_of_each_problem(records, stats) if dedup else records:
        pending.append(_out_record(row, raw, stats["rows_written"]))
        stats["rows_written"] += 1
        if len(pending) >= _WRITE_ROWS:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))
            pending = []
    if pending:
        writer.write_table(pa.Table.from_pylist(pending, schema=schema))


def prepare(inputs: List[str], output: str, *, dedup: bool, skip_malformed: bool, template: str) -> dict:
    """Write the clean parquet; return the counts. Raises on bad input, leaving no output behind.

    Invariant: ``output`` is replaced only by a complete file with at least one row; on any error
    (or interrupt) the temporary file is removed and ``output`` is as it was.
    """
    import pyarrow.parquet as pq

    check_output(inputs, output)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder does not exist: {out_dir}")
    stats: dict = {"rows_read": 0, "malformed_skipped": 0, "duplicates_dropped": 0, "rows_written": 0}
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    schema = _schema()
    writer: Optional[Any] = None
    try:
        writer = pq.ParquetWriter(tmp, schema)
        records = iter_prompt_records(inputs, template=template, skip_malformed=skip_malformed, stats=stats,
                                      origin=TOOL_ORIGIN)  # fmt: skip
        _write_rows(writer, schema, records, stats, dedup)
        if stats["rows_written"] == 0:  # a 0-row file would pass for a prepared dataset
            counts = {k: v for k, v in stats.items() if k != "rows_written"}
            raise empty_dataset_error(inputs, counts, TOOL_ORIGIN)
        writer.close()
        writer = None
        os.replace(tmp, output)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):  # the original error is what matters
                writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return stats


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Validate DAPO-schema prompt files (parquet/jsonl) and write one clean parquet.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[-1] if __doc__ else None,
    )
    parser.add_argument("inputs", nargs="+", help="input .parquet / .jsonl files (read in order)")
    parser.add_argument("-o", "--output", required=True, help="output .parquet file (replaced atomically)")
    parser.add_argument("--dedup", action="store_true", help="keep only the first row of each distinct problem")
    parser.add_argument(
        "--skip-malformed", action="store_true", help="skip and count malformed rows instead of failing"
    )
    parser.add_argument(
        "--template", choices=("none", "dapo"), default="none", help="prompt template to apply (default: none)"
    )
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".parquet"):
        parser.error(f"--output must end in .parquet, got {args.output}")
    try:
        stats = prepare(
            args.inputs, args.output, dedup=args.dedup, skip_malformed=args.skip_malformed, template=args.template
        )
    except (Refused, DataError, FileNotFoundError, ValueError) as exc:  # the input: the user can fix it
        print(f"prepare_dapo_data: error: {_one_line(exc)}; no output written", file=sys.stderr)
        return 2
    except OSError as exc:  # writing failed (disk full, permissions)
        print(f"prepare_dapo_data: error: {_one_line(exc)}; no output written", file=sys.stderr)
        return 1
    print(
        f"prepare_dapo_data: rows in {stats['rows_read']}, rows out {stats['rows_written']}, "
        f"duplicates dropped {stats['duplicates_dropped']}, malformed skipped {stats['malformed_skipped']} "
        f"-> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

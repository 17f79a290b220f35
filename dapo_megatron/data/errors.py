"""Errors for bad prompt data, and the names of the settings that fix them.

Invariant: every error raised while reading prompt data is a :class:`DataError` (a ``ValueError``)
or a ``FileNotFoundError``, and its one-line message names

* *where*: the file, and the row (0-based data row of that file) and, for jsonl, the 1-based line;
* *what*: the field or property that is wrong, with what was found;
* *the fix*: the config key or tool flag that changes the outcome (``data.train_files``,
  ``data.skip_malformed=true``, ``rollout.max_prompt_len``, or the tool's ``--skip-malformed``).

The loader does not know whether it is reading training files, evaluation files or a tool's inputs,
so the caller passes a :class:`DataOrigin` naming its keys; the default is the trainer's
``data.train_files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataOrigin:
    """What the user calls the files being read and the settings that change how they are read.

    ``files_key``: the config key or flag that lists the files (``data.train_files``).
    ``skip_setting``: how to leave malformed rows out (``set data.skip_malformed=true``), or
    ``None`` where rows are never skipped (evaluation sets: a skipped row would change avg@k).
    ``length_key``: the config key bounding prompt length in tokens, or ``None`` where none applies.
    """

    files_key: str = "data.train_files"
    skip_setting: Optional[str] = "set data.skip_malformed=true"
    length_key: Optional[str] = "rollout.max_prompt_len"

    def row_fix(self, what: str = "malformed rows") -> str:
        """The fix for a bad row: skip it when the caller can, else fix or remove it."""
        listed = f"(file listed in {self.files_key})"
        if self.skip_setting:
            return f"fix or remove the row, or {self.skip_setting} to leave {what} out {listed}"
        return f"fix or remove the row {listed}"

    def file_fix(self) -> str:
        """The fix for a file that cannot be used at all (skipping rows does not help)."""
        return f"re-create the file or remove it from {self.files_key}"


#: What the trainer's own files are called (the default everywhere).
TRAIN_ORIGIN = DataOrigin()
#: Evaluation sets: rows are never skipped, so the fix is always to repair the file.
EVAL_ORIGIN = DataOrigin(files_key="data.eval_files", skip_setting=None)


def row_where(path: str, row: Optional[int], line: Optional[int]) -> str:
    """``"<file> row <n> (line <l>)"``, the start of every row error (``row=None``: the file only)."""
    where = path if row is None else f"{path} row {row}"
    return where + (f" (line {line})" if line is not None else "")


def _one_line(text: str) -> str:
    # messages from pyarrow or json can span lines; a CLI prints exactly one line per error
    return " ".join(str(text).split())


class DataError(ValueError):
    """Bad prompt data. ``path``, ``row`` and ``line`` say where (``None`` where not known)."""

    def __init__(self, message: str, *, path: str = "", row: Optional[int] = None, line: Optional[int] = None):
        super().__init__(_one_line(message))
        self.path, self.row, self.line = path, row, line


class MalformedRowError(DataError):
    """A row does not follow the schema (or breaks a bound checked at load time).

    The message reads ``"<file> row <n>[ (line <l>)]: field '<field>' <what>[; <fix>]"``.
    ``path``, ``row`` (0-based data row in the file), ``line`` and ``field`` are attributes;
    :meth:`with_fix` returns the same error with the fix appended (the reader adds it, since only
    the caller knows which setting fixes it).
    """

    def __init__(self, path: str, row: int, field: str, message: str, line: Optional[int] = None, fix: str = ""):
        text = f"{row_where(path, row, line)}: field '{field}' {message}" + (f"; {fix}" if fix else "")
        super().__init__(text, path=path, row=row, line=line)
        self.field, self.detail, self.fix = field, message, fix
        self.row_index: int = row  # always known for a row error (``row`` is Optional on DataError)

    def with_fix(self, fix: str) -> MalformedRowError:
        """A copy of this error whose message ends with ``fix``."""
        return MalformedRowError(self.path, self.row_index, self.field, self.detail, self.line, fix)


class DataFileError(DataError):
    """A whole file is unusable: not readable as its type, corrupt, or without any data row."""

    def __init__(self, path: str, problem: str, fix: str, *, row: Optional[int] = None):
        super().__init__(f"{path}: {problem}; {fix}", path=path, row=row)


class EmptyDatasetError(DataError):
    """Every file was read but no row is left to train or evaluate on."""


class PromptTooLongError(DataError):
    """A tokenized prompt exceeds the token bound; the message names the file, row and config key."""


class EmptyPromptError(DataError):
    """A prompt tokenized to no tokens at all (generation needs at least one)."""

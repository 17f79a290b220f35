"""The one named error for bad user input, and the entry-point wrapper that reports it.

Layering: stdlib only, so every layer (rewards, data, weights, observability, the tools) may raise
:class:`InputError` where it reads an input. Convert at that point, naming the input: a
``UnicodeDecodeError`` or ``json.JSONDecodeError`` from a library does not say which file it came
from, and catching those high up would also hide genuine bugs.
"""

from __future__ import annotations

import sys
from typing import Callable

# OS errors that carry the path of the input that was missing or of the wrong kind (``filename``).
INPUT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class InputError(ValueError):
    """A user-supplied input (file, folder, flag) is missing, unreadable or malformed.

    The message names the input (path, and line/row/field where there is one) and says what was
    expected. A ``ValueError`` so that callers written before it existed still catch it.
    """


def report_input_errors(prog: str, run: Callable[[], int]) -> int:
    """``run()``, with an input error turned into one line ``<prog>: error: <message>`` on stderr and
    exit status 2 (the usage-error status argparse uses). Anything else propagates with its traceback.

    An OS error counts as an input error only when it names a path (``filename``): that path is
    the input the user gave, or one derived from it.
    """
    try:
        return run()
    except InputError as e:
        message = str(e)
    except INPUT_OS_ERRORS as e:
        if e.filename is None:
            raise
        message = f"{e.filename}: {e.strerror or type(e).__name__}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2

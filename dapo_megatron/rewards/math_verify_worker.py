"""The child side of ``MathVerifyScorer``: a loop that judges answers with math-verify.

Started by the parent as ``python -c "...; main()"`` (not through ``multiprocessing``, whose spawn
and forkserver modes re-import the parent's ``__main__``). The protocol is one JSON object per line:

* child -> parent, once at start: ``{"ready": true}`` or ``{"error": "<why>"}``;
* parent -> child, per job: ``{"gold": str, "pred": str, "answer_line": bool}``;
* child -> parent, per job: ``{"acc": bool, "pred": str}``.

math-verify's own ``signal.alarm`` timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``): the parent enforces the bound by killing this process. The protocol
writes go to a private copy of the original stdout; fd 1 is pointed at stderr so that a stray
``print`` in a library cannot corrupt the stream. Only stdlib imports at module level.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, BinaryIO

INVALID = "[INVALID]"
MAX_PRED_CHARS = 300


def _has_delimiters(text: str) -> bool:
    return any(mark in text for mark in ("$", "\\boxed", "\\(", "\\["))


def parse_expression(mv: Any, text: str) -> list[Any]:
    """Parse an answer that stands alone (a ground truth or an ``Answer:`` line).

    A bare answer ("0.5", "(1,2)", "x^2+1") parses best as inline LaTeX; text that carries its own
    delimiters or a ``\\boxed`` is tried as is first. The other form is the fallback.
    """
    forms = (text, "$" + text + "$") if _has_delimiters(text) else ("$" + text + "$", text)
    for form in forms:
        parsed = mv.parse(form, parsing_timeout=None)
        if parsed:
            return list(parsed)
    return []


def judge(mv: Any, gold_text: str, pred_text: str, answer_line: bool) -> tuple[bool, str]:
    """Whether ``pred_text`` is equivalent to ``gold_text``, and the extracted prediction.

    ``answer_line`` says ``pred_text`` is the content of an ``Answer:`` line; otherwise it is the
    response tail, searched by math-verify (``\\boxed{}`` first).
    """
    gold = parse_expression(mv, gold_text)
    pred = parse_expression(mv, pred_text) if answer_line else list(mv.parse(pred_text, parsing_timeout=None))
    if not pred:
        return False, INVALID
    shown = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    if not gold:
        return False, shown
    return bool(mv.verify(gold, pred, timeout_seconds=None)), shown


def _exit_when_orphaned(parent_pid: int) -> None:
    # If the parent dies mid-job nobody will kill us; stop on our own once we are re-parented.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _send(out: BinaryIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode("ascii") + b"\n")
    out.flush()


def main() -> None:
    """Serve jobs from stdin until EOF."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    import logging

    # math-verify warns once that its timeout is disabled; that is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        import math_verify as mv
    except Exception as exc:
        _send(out, {"error": repr(exc)})
        return
    _send(out, {"ready": True})
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            acc, shown = judge(mv, str(job["gold"]), str(job["pred"]), bool(job["answer_line"]))
        except Exception:
            acc, shown = False, INVALID
        _send(out, {"acc": acc, "pred": shown[:MAX_PRED_CHARS]})

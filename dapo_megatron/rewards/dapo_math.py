"""The DAPO-Math rule reward: extract ``Answer: ...`` from the tail of a response, normalise, compare.

This reproduces the reference DAPO scorer (a Minerva-style normaliser) so that scores are comparable
with published numbers, quirks included; see ``normalize_answer`` for the steps and their order.

Safety on untrusted text:

* only the last ``TAIL_CHARS`` characters of a response are examined, so a 10 MB response costs a
  slice; the one regex (``ANSWER_PATTERN``) runs on that bounded tail only;
* every step of the normaliser is a plain string operation or a hand-written forward scan, linear in
  the length of its input, so a long ground truth is safe as well (no backtracking regex anywhere);
* a ground truth is normalised once (an LRU cache keyed by the string: a group's responses share
  one), and one over ``MAX_GROUND_TRUTH_CHARS`` is never normalised (scored wrong; loaders refuse it);
* nothing is evaluated, and ``score_dapo_math`` catches every exception and reports it as wrong.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

from dapo_megatron.rewards.base import INVALID, MAX_GROUND_TRUTH_CHARS, RewardResult, wrong

TAIL_CHARS = 300
"""How many trailing characters of a response are searched for the answer."""

ANSWER_PATTERN = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)
"""The reference answer line; the last match in the tail wins."""

# Step 2, in the reference order. The order matters for odd inputs such as "\.$" (".$" -> "$" runs
# before "\$" is removed), so it is kept exactly.
_SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Step 3: unit words and tokens deleted wherever they occur (plain substring removal, in this order,
# so e.g. "issue" loses "sue"; that is the reference behaviour).
_REMOVED: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)


def _first_dollar_pair(line: str) -> str:
    # The reference runs `(.*?)\$(.*?)\$(.*)` -> `$\2$`; since `.` stops at newlines, on each line
    # holding two or more "$" the whole line becomes the content of its first $...$ pair.
    first = line.find("$")
    if first < 0:
        return line
    second = line.find("$", first + 1)
    if second < 0:
        return line
    return "$" + line[first + 1 : second] + "$"


def _unwrap_shortest(s: str, prefix: str) -> str:
    """Replace each ``prefix + X + "}"`` by ``X``, X the shortest run without a newline.

    Same result as ``re.sub(re.escape(prefix) + r"(.*?)\\}", r"\\1", s)`` but linear: the positions of
    the next ``}`` and the next newline are cached, and every search only moves forward.
    """
    out: list[str] = []
    pos = 0
    next_close = -2  # -2: not searched yet; -1: none left
    next_newline = -2
    while True:
        start = s.find(prefix, pos)
        if start < 0:
            break
        inner = start + len(prefix)
        if next_close != -1 and next_close < inner:
            next_close = s.find("}", inner)
        if next_newline != -1 and next_newline < inner:
            next_newline = s.find("\n", inner)
        if next_close >= 0 and (next_newline < 0 or next_close < next_newline):
            out.append(s[pos:start])
            out.append(s[inner:next_close])
            pos = next_close + 1
        else:
            # No "}" on this line after the prefix: this occurrence stays as it is.
            out.append(s[pos : start + 1])
            pos = start + 1
    out.append(s[pos:])
    return "".join(out)


def _unwrap_boxed_greedy(line: str) -> str:
    # The reference runs the greedy `\\boxed\{(.*)\}` -> `\1`: from the first "\boxed{" of a line to
    # the line's LAST "}". Done with find/rfind, which is linear and needs no nested matching.
    prefix = "\\boxed{"
    start = line.find(prefix)
    if start < 0:
        return line
    close = line.rfind("}")
    if close < start + len(prefix):
        return line
    return line[:start] + line[start + len(prefix) : close] + line[close + 1 :]


def _expand_frac(s: str) -> str:
    # `frac([^{])(.)` -> `frac{\1}{\2}`: "\frac12" becomes "\frac{1}{2}". The second character may
    # not be a newline (regex `.`), the first may.
    out: list[str] = []
    pos = 0
    search = 0
    while True:
        i = s.find("frac", search)
        if i < 0:
            break
        a, b = i + 4, i + 5
        if b < len(s) and s[a] != "{" and s[b] != "\n":
            out.append(s[pos:i])
            out.append("frac{" + s[a] + "}{" + s[b] + "}")
            pos = search = b + 1
        else:
            search = i + 1
    out.append(s[pos:])
    return "".join(out)


def _expand_sqrt(s: str) -> str:
    # `sqrt([^{])` -> `sqrt{\1}`: "\sqrt2" becomes "\sqrt{2}".
    out: list[str] = []
    pos = 0
    while True:
        i = s.find("sqrt", pos)
        if i < 0:
            break
        a = i + 4
        if a < len(s) and s[a] != "{":
            out.append(s[pos:i])
            out.append("sqrt{" + s[a] + "}")
            pos = a + 1
        else:
            out.append(s[pos : i + 1])
            pos = i + 1
    out.append(s[pos:])
    return "".join(out)


def normalize_answer(s: str) -> str:
    """Normalise a final answer exactly as the reference DAPO scorer does.

    Steps, in order: (1) keep the text after the last ``=``; (2) the substitutions in
    ``_SUBSTITUTIONS`` (drop "an ", "a ", "\\$", "\\ " and spaces, ".$" -> "$", mbox -> text,
    "\\text{and}" -> ",", "\\text{m}" -> "\\text{}"); (3) delete the unit words and tokens in
    ``_REMOVED``; (4) keep only the first ``$...$`` of each line; (5) unwrap ``\\text{}``, ``\\textbf{}``,
    ``\\overline{}`` (up to the first ``}``) and ``\\boxed{}`` (up to the line's last ``}``);
    (6) ``\\fracab`` -> ``\\frac{a}{b}`` and ``\\sqrta`` -> ``\\sqrt{a}``; (7) drop ``$``; (8) if only
    digits remain once commas are dropped, drop the commas; (9) strip surrounding whitespace.

    Runs in time linear in ``len(s)``. Pure: no evaluation of the text.
    """
    s = s.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    for token in _REMOVED:
        s = s.replace(token, "")
    s = "\n".join(_first_dollar_pair(line) for line in s.split("\n"))
    for prefix in ("\\text{", "\\textbf{", "\\overline{"):
        s = _unwrap_shortest(s, prefix)
    s = "\n".join(_unwrap_boxed_greedy(line) for line in s.split("\n"))
    s = _expand_sqrt(_expand_frac(s))
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def extract_answer(text: str) -> str:
    """The raw answer of a response: the last ``Answer: ...`` line within its last 300 characters.

    The match is case-insensitive and runs to the end of its line (``Answer\\s*:\\s*([^\\n]+)``).
    Returns ``"[INVALID]"`` when there is no match. The regex only ever sees the bounded tail.
    """
    matches = ANSWER_PATTERN.findall(text[-TAIL_CHARS:])
    return matches[-1] if matches else INVALID


def strip_eos(response: str, eos_text: Optional[str]) -> str:
    """Remove one trailing ``eos_text`` (the decoded EOS token) if the response ends with it."""
    if isinstance(eos_text, str) and eos_text and response.endswith(eos_text):
        return response[: -len(eos_text)]
    return response


GROUND_TRUTH_CACHE_SIZE = 4096
"""Normalised ground truths kept; with the length bound the cache holds at most about
``2 * 4096 * MAX_GROUND_TRUTH_CHARS`` characters (33 MB), in practice a few hundred short answers."""


@functools.lru_cache(maxsize=GROUND_TRUTH_CACHE_SIZE)
def normalized_ground_truth(ground_truth: str) -> str:
    """``normalize_answer(ground_truth)``, computed once per distinct string (thread-safe cache).

    Callers check the length bound first, so the cache never holds an over-long key.
    """
    return normalize_answer(ground_truth)


def score_dapo_math(response: str, ground_truth: str, *, eos_text: Optional[str] = None) -> RewardResult:
    """Score a decoded response against a ground truth with the DAPO-Math rule.

    Args:
        response: the decoded response (special tokens already skipped by the caller).
        ground_truth: the reference answer; it is normalised with the same rule (once per distinct
            string, cached). Over ``MAX_GROUND_TRUTH_CHARS`` characters it is scored wrong unread.
        eos_text: the decoded EOS token; one trailing copy is stripped before the tail is taken.

    Returns:
        ``RewardResult(+1.0, True, pred)`` when the normalised prediction equals the normalised
        ground truth, else ``RewardResult(-1.0, False, pred)``; ``pred`` is the normalised
        prediction, or ``"[INVALID]"`` when no answer line was found or the input is not a string.
        Never raises.
    """
    pred = INVALID
    try:
        if not isinstance(response, str):
            return wrong()
        raw = extract_answer(strip_eos(response, eos_text))
        if raw == INVALID:
            return wrong()
        pred = normalize_answer(raw)
        if not isinstance(ground_truth, str) or len(ground_truth) > MAX_GROUND_TRUTH_CHARS:
            return wrong(pred)  # over-long: refused at load time; never normalised here (bounded cost)
        if pred == normalized_ground_truth(ground_truth):
            return RewardResult(score=1.0, acc=True, pred=pred)
        return wrong(pred)
    except Exception:  # untrusted input must never take the trainer down
        return wrong(pred)

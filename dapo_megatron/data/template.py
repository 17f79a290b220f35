"""The DAPO prompt template.

The template (verbatim from the DAPO recipe) asks for the answer on a final ``Answer: ...`` line,
which is what the ``dapo_math`` rule scorer reads back.

How ``data.template`` is applied to a row's user message (see :func:`apply_template`):

* ``"dapo"``: the released DAPO-Math-17k and AIME-2024 files already hold the *templated* prompt in
  ``prompt[0].content``. Content that already starts with the template's first sentence
  (:data:`DAPO_TEMPLATE_PREFIX`) is kept exactly as it is, so templating is idempotent; any other
  content is treated as the raw problem and wrapped with :func:`format_dapo_prompt`.
* ``"none"``: the content is used as it is.

The result is later wrapped in the model's chat template (with the generation prompt) by
:meth:`dapo_megatron.data.dataset.PromptDataset.tokenize`.
"""

from __future__ import annotations

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

#: The template's first sentence: content starting with it is taken as already templated.
DAPO_TEMPLATE_PREFIX = "Solve the following math problem step by step."

TEMPLATES = ("dapo", "none")


def format_dapo_prompt(problem: str) -> str:
    """Wrap a raw problem statement in :data:`DAPO_TEMPLATE`.

    Plain substitution, not ``str.format``: braces in LaTeX problems are never interpreted.
    """
    head, tail = DAPO_TEMPLATE.split("{problem}")
    return head + problem + tail


def apply_template(content: str, template: str) -> str:
    """The user content after applying ``template`` (``"dapo"`` or ``"none"``; see module doc)."""
    if template == "none":
        return content
    if template == "dapo":
        if content.startswith(DAPO_TEMPLATE_PREFIX):
            return content
        return format_dapo_prompt(content)
    raise ValueError(f"unknown prompt template {template!r}; allowed values are {', '.join(map(repr, TEMPLATES))}")

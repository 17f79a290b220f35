"""Does a tokenizer fit the model it is paired with? Checked at start-up by ``train`` and ``export``.

A tokenizer with more tokens than the model's ``vocab_size`` pairs ids with no embedding row and no
logit: the policy can never sample them, prompts holding them index past the embedding table, and
an exported folder would ship the mismatch. (A tokenizer *smaller* than the vocabulary is normal:
HF configs round ``vocab_size`` up, e.g. Qwen2.5's 151,665 tokens in 151,936 rows.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# Files that hold a vocabulary: without any of them a folder has no tokenizer to check (the
# converters' test folders carry only placeholder configs).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def tokenizer_size(folder: str) -> Optional[int]:
    """``len(tokenizer)`` of the HF tokenizer in ``folder`` (added tokens included), or None when the
    folder has no vocabulary file. A tokenizer that fails to load raises ``ValueError`` naming it."""
    if not any(Path(folder, name).is_file() for name in VOCAB_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: its tokenizer files do not load: {e}") from None


def tokenizer_problem(tokens: int, vocab_size: int, *, source: str, rows: Optional[int] = None) -> Optional[str]:
    """Why ``tokens`` tokenizer entries do not fit a model of ``vocab_size`` (and ``rows`` embedding
    rows in its checkpoint, when known), as one line starting with ``source``; None when they fit.

    Invariant when None: every token id is < vocab_size <= rows, so it has an embedding and a logit.
    """
    if tokens <= vocab_size and (rows is None or tokens <= rows):
        return None
    seen = f"vocab_size={vocab_size}" + (f" and {rows} checkpoint embedding rows" if rows is not None else "")
    return (
        f"{source}: the tokenizer has {tokens} tokens but the model has {seen}; ids from {vocab_size} up "
        "could never be sampled or trained. Pair the model with the tokenizer it was built for"
    )

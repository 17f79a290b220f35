"""Partial rollouts: responses cut by a weight update, kept with their tokens, continued later.

A trajectory in progress is a :class:`~dapo_megatron.rollout.base.Completion` whose
``finish_reason`` is ``"abort"``; ``meta["token_versions"]`` holds the weight version of each of its
tokens. Continuing it sends ``prompt + response so far`` back to an engine with the remaining token
budget; :func:`extend` concatenates the new segment (tokens, log-probs, versions). The log-probs of
each segment are the engine's under the weights that drew it, so the concatenation is exactly the
behaviour policy of the whole response (the off-policy correction relies on it).

For the checkpoint a group in progress travels as a :class:`~dapo_megatron.types.Group` whose
unfinished samples have ``finish_reason="abort"`` (JSON data, like every ``extra_state``):
:func:`to_group` and :func:`from_group` convert.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from dapo_megatron.rollout.base import Completion
from dapo_megatron.types import Group, Sample

GID = "group_id"  # metadata key of a group's id (seeds derive from it)


def versions_of(c: Completion) -> List[int]:
    """Per-token weight versions of ``c`` (``weight_version`` throughout when the engine gave none)."""
    return list(c.meta.get("token_versions", [c.weight_version] * len(c.token_ids)))


def unfinished(c: Optional[Completion]) -> bool:
    """Not started (None) or cut short (``abort``): it needs another segment."""
    return c is None or c.finish_reason == "abort"


def extend(prev: Optional[Completion], new: Completion, *, max_response_len: int) -> Completion:
    """``prev`` followed by the segment ``new``; ``weight_version`` becomes the oldest token's version.

    A segment that stopped at a per-segment cap (``length`` below ``max_response_len``) is still
    unfinished: it comes back as ``abort``."""
    tokens = (prev.token_ids if prev else []) + list(new.token_ids)
    logprobs = (prev.logprobs if prev else []) + list(new.logprobs)
    versions = (versions_of(prev) if prev else []) + [new.weight_version] * len(new.token_ids)
    reason = new.finish_reason
    if reason == "length" and len(tokens) < max_response_len:
        reason = "abort"
    oldest = min(versions) if versions else new.weight_version
    return Completion(tokens, logprobs, reason, weight_version=oldest, meta={"token_versions": versions})


def oldest_version(parts: List[Optional[Completion]]) -> Optional[int]:
    """The oldest token version of a group in progress (None when it has no token yet)."""
    versions = [v for c in parts if c is not None for v in versions_of(c)]
    return min(versions) if versions else None


def to_group(prompt_index: int, prompt_ids: List[int], ground_truth: str, metadata: dict,
             parts: List[Optional[Completion]]) -> Group:  # fmt: skip
    """A group in progress as checkpointable data (a not-yet-started sample is an empty ``abort``)."""
    samples = []
    for c in parts:
        c = c or Completion([], [], "abort")
        v = versions_of(c)
        samples.append(Sample(list(prompt_ids), list(c.token_ids), list(c.logprobs), c.finish_reason,
                              weight_version=min(v) if v else c.weight_version, token_versions=v))  # fmt: skip
    return Group(prompt_index, ground_truth, samples, metadata=dict(metadata))


def from_group(group: Group) -> Tuple[dict, List[Optional[Completion]]]:
    """Inverse of :func:`to_group`: the group's metadata and its per-sample completions so far."""
    parts: List[Optional[Completion]] = []
    for s in group.samples:
        if s.finish_reason == "abort" and not s.response_ids:
            parts.append(None)
            continue
        parts.append(Completion(list(s.response_ids), list(s.response_logprobs), s.finish_reason,
                                weight_version=s.weight_version, meta={"token_versions": s.versions()}))  # fmt: skip
    return dict(group.metadata), parts

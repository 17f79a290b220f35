"""Dynamic sampling: keep only prompt groups whose correctness varies, refill, and bound the effort.

A group whose responses are all right (or all wrong) has zero advantage everywhere, so it adds no
gradient and only dilutes the token-mean. DAPO filters on **accuracy**, not on the shaped reward:
the overlong penalty makes an all-wrong group's shaped rewards differ, and it would wrongly pass.
Per step: ``while acc.begin_round(): submit a round; acc.offer(group, accs)`` for each completed
group, abort in-flight requests once ``acc.is_full``; then ``batch = acc.take()``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

# What a checkpoint holds, as attribute names (saved without the leading underscore).
_STATE = ("rounds", "generated", "_kept", "_dropped", "surplus", "last_metrics")


def group_is_informative(values: Sequence[float]) -> bool:
    """True iff the group has at least 2 values and they are not all equal (std > 0)."""
    return len(values) >= 2 and any(v != values[0] for v in values)


class DynamicSamplingExhausted(RuntimeError):
    """Raised when the generation-round bound is hit before the batch holds enough varied groups."""


class GroupAccumulator:
    """Collects ``target_groups`` informative groups for one step, as plain resumable state.

    Groups are opaque objects (e.g. :class:`dapo_megatron.types.Group`), picklable so that
    :meth:`state_dict` can be saved. ``max_num_gen_batches`` bounds the generation rounds per step
    (0 = unlimited); hitting it while not full raises :class:`DynamicSamplingExhausted` with
    ``on_exhausted="error"``, while ``"pad"`` lets :meth:`take` fill up with dropped zero-variance
    groups. With ``enabled=False`` every offered group is kept (plain GRPO batching)."""

    def __init__(
        self, target_groups: int, max_num_gen_batches: int = 0, on_exhausted: str = "error", enabled: bool = True
    ) -> None:
        if target_groups < 1 or max_num_gen_batches < 0 or on_exhausted not in ("error", "pad"):
            raise ValueError(
                f"GroupAccumulator: need target_groups >= 1, max_num_gen_batches >= 0 and "
                f"on_exhausted in ('error', 'pad'); got {target_groups}, {max_num_gen_batches}, "
                f"{on_exhausted!r}"
            )
        self.target_groups = target_groups
        self.max_num_gen_batches = max_num_gen_batches
        self.on_exhausted = on_exhausted
        self.enabled = enabled
        self.surplus: List[Any] = []  # groups trimmed by the last take()
        self.last_metrics: Dict[str, float] = {}  # metrics() of the step the last take() finished
        self._reset()

    def _reset(self) -> None:
        self.rounds, self.generated = 0, 0
        self._kept: List[Any] = []
        self._dropped: List[Any] = []  # zero-variance groups, oldest first, at most target_groups

    @property
    def kept(self) -> int:
        return len(self._kept)

    @property
    def kept_ratio(self) -> float:
        return self.kept / self.generated if self.generated else 0.0

    @property
    def is_full(self) -> bool:
        return self.kept >= self.target_groups

    @property
    def exhausted(self) -> bool:
        """The round bound is used up (never with max_num_gen_batches=0)."""
        return 0 < self.max_num_gen_batches <= self.rounds

    @property
    def needs_padding(self) -> bool:
        """Not full, out of rounds, and on_exhausted="pad": :meth:`take` will pad."""
        return not self.is_full and self.exhausted and self.on_exhausted == "pad"

    def _error(self, extra: str = "") -> DynamicSamplingExhausted:
        return DynamicSamplingExhausted(
            f"dynamic sampling exhausted: used {self.rounds} generation rounds "
            f"(algo.filter_groups.max_num_gen_batches={self.max_num_gen_batches}) and kept "
            f"{self.kept}/{self.target_groups} groups whose accuracy varies ({self.generated} generated). "
            "The data may be too easy or too hard for the model (every response right, or every one wrong). "
            "Raise algo.filter_groups.max_num_gen_batches (0 = unlimited), or set "
            f"algo.filter_groups.on_exhausted=pad to fill the batch with zero-variance groups.{extra}"
        )

    def begin_round(self) -> bool:
        """Count a new generation round: True means generate, False means stop and call :meth:`take`
        (already full, or out of rounds with on_exhausted="pad"). Out of rounds with "error": raise."""
        if not self.is_full and self.exhausted and self.on_exhausted == "error":
            raise self._error()
        if self.is_full or self.exhausted:
            return False
        self.rounds += 1
        return True

    def offer(self, group: Any, metric_values: Sequence[float]) -> bool:
        """Offer a completed group with its per-sample metric (e.g. acc); True if kept. Groups arriving
        after the batch is full (in-flight requests finishing) are kept and become surplus in take()."""
        self.generated += 1
        if not self.enabled or group_is_informative(metric_values):
            self._kept.append(group)
            return True
        # Only target_groups padding groups can ever be needed, so memory stays bounded.
        if len(self._dropped) < self.target_groups:
            self._dropped.append(group)
        return False

    def take(self) -> List[Any]:
        """Exactly ``target_groups`` groups (kept ones in arrival order; the rest go to ``surplus``),
        then reset for the next step. When padding (:attr:`needs_padding`), the dropped zero-variance
        groups complete the batch in arrival order: all carry zero advantage, so none is better for
        the gradient, and arrival order keeps the choice deterministic."""
        if self.is_full:
            batch, self.surplus = self._kept[: self.target_groups], self._kept[self.target_groups :]
        elif self.needs_padding:
            missing = self.target_groups - self.kept
            if len(self._dropped) < missing:
                raise self._error(
                    f" Padding needs {missing} zero-variance groups but only {len(self._dropped)} were generated."
                )
            batch, self.surplus = self._kept + self._dropped[:missing], []
        else:
            raise RuntimeError(f"take() before the batch is full ({self.kept}/{self.target_groups}); generate more")
        padded = max(0, self.target_groups - self.kept)
        self.last_metrics = {**self.metrics(), "ds/padded_groups": float(padded)}
        self._reset()
        return batch

    def metrics(self) -> Dict[str, float]:
        """Counters of the step in progress (after :meth:`take`, read :attr:`last_metrics`)."""
        return {
            "ds/generated_groups": float(self.generated),
            "ds/kept_groups": float(self.kept),
            "ds/kept_ratio": self.kept_ratio,
            "ds/rounds": float(self.rounds),
        }

    def state_dict(self) -> Dict[str, Any]:
        """Plain-python state: counters, and shallow copies of the group lists as given (pickle it)."""
        return {key.lstrip("_"): copy.copy(getattr(self, key)) for key in _STATE}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the settings (target, bound, mode) stay the constructor's."""
        for key in _STATE:
            setattr(self, key, copy.copy(state[key.lstrip("_")]))

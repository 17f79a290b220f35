"""A seeded, resumable sampler over prompt indices.

Each epoch visits every index once. With ``shuffle`` the order of epoch ``e`` is a permutation
drawn from ``random.Random`` seeded with the string ``"dapo-sampler:{seed}:{epoch}"`` (string
seeds are hashed with SHA-512, so the order is the same on every machine and Python run); without
``shuffle`` it is ``0, 1, ..., n-1``. The permutation is recomputed from ``(seed, epoch)`` rather
than stored, so the state is just ``(epoch, position)`` and a resumed sampler continues exactly
where the saved one stopped.
"""

from __future__ import annotations

import random
from typing import List

# what changes each saved field, so a refused resume says which setting to restore
_CHANGED_HINT = {
    "num_items": "The prompt dataset changed since the checkpoint (data.train_files, data.dedup, data.skip_malformed "
    "or rollout.max_prompt_len): resume with the same data, or train into a new run.dir",
    "seed": "Resume with the checkpoint's data.seed, or train into a new run.dir",
    "shuffle": "Resume with the checkpoint's data.shuffle, or train into a new run.dir",
}


class ResumableSampler:
    """Draws prompt indices across epoch boundaries, resumable from :meth:`state_dict`.

    ``epoch`` is the epoch being read and ``position`` how many of its indices were already
    drawn; when an epoch is used up the sampler moves on at once (``epoch += 1``, ``position = 0``),
    so after drawing exactly ``num_items`` indices ``epoch == 1``.
    """

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True):
        if num_items < 1:
            # the loader refuses an empty dataset first, naming its files; reaching this is a caller bug
            raise ValueError(f"ResumableSampler needs at least one item, got num_items={num_items}: the prompt "
                             "dataset is empty (check data.train_files)")  # fmt: skip
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order: List[int] = []
        self._order_epoch = -1

    def _epoch_order(self, epoch: int) -> List[int]:
        if self._order_epoch != epoch:
            order = list(range(self.num_items))
            if self.shuffle:
                random.Random(f"dapo-sampler:{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_indices(self, k: int) -> List[int]:
        """The next ``k`` indices, continuing into new epochs as needed (``k`` may exceed ``num_items``)."""
        if k < 0:
            raise ValueError(f"next_indices: k must be >= 0, got {k}")
        out: List[int] = []
        while len(out) < k:
            order = self._epoch_order(self.epoch)
            take = min(k - len(out), self.num_items - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict:
        """Plain-Python state (JSON-serialisable)."""
        return {
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state. The dataset size, seed and shuffle flag must match the saved ones."""
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; the sequence would not continue identically. "
                    f"{_CHANGED_HINT[key]}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(
                f"sampler state out of range: epoch={epoch}, position={position}, num_items={self.num_items}"
            )
        self.epoch, self.position = epoch, position

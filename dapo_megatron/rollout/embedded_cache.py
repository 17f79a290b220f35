"""The embedded engine's preallocated KV cache: ``slots`` rows of a fixed ``width``, one per sequence.

Every decode step runs the model on ``input_ids [rows, 1]`` for the first ``rows`` slots (one token per
slot; a free slot feeds a pad token at position 0), each layer writes the new key/value of slot ``s``
at ``write_pos[s]`` and attends over all ``width`` positions with a mask that lets slot ``s`` see
positions ``0..write_pos[s]``. ``rows`` is one of a few fixed decode shapes (:func:`decode_shapes`):
the smallest that holds every running row (the scheduler moves rows down into free slots, ``move``),
so a step over a few requests does not pay for all slots.

Prompts are prefilled up to :data:`PREFILL_ROWS` at a time, right-padded to a width fixed by their
length (:func:`prefill_width`).

Why fixed shapes: a row's numerics must never depend on how many other rows share the batch (CPU
GEMM kernels may pick different blocking, and a one-row GEMM a different kernel, for different row
counts; a wider attention changes the softmax's reduction order). The attention width is fixed, and
the row counts are a fixed ladder whose rungs are accepted only after :func:`batch_invariant_shapes`
found, on this machine's kernels, every row of a probe step bitwise equal in each of them and in the
full ``slots`` step (otherwise every step runs all slots). A row's output is then bitwise the same in
any slot, next to any neighbours; ``tests/test_embedded_batching.py`` checks it end to end.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

PREFILL_ROWS = 8  # prompts per prefill forward; a pass with fewer pads the rest (its shape is fixed)
_MIN_PREFILL_WIDTH = 8
_DECODE_RUNGS = 8  # decode shapes: slots split into this many rungs (each a multiple of 8 rows)


def decode_shapes(slots: int) -> List[int]:
    """The candidate decode row counts for ``slots`` slots, ascending, the last ``slots`` itself:
    multiples of a step of ``slots / 8`` rows (rounded up to 8), so a step over ``k`` busy slots
    computes at most one step's worth of idle rows past the last busy one."""
    step = max(8, -(-slots // _DECODE_RUNGS // 8) * 8)
    return sorted({min(slots, k) for k in range(step, slots + step, step)})


def prefill_width(length: int, cap: int) -> int:
    """The padded width of a ``length``-token prompt's prefill: the next power of two (at least 8),
    at most the cache width ``cap``. A function of the prompt alone, so a prompt always runs in the same
    shape; powers of two keep the padding under half of a pass."""
    width = _MIN_PREFILL_WIDTH
    while width < length:
        width *= 2
    return min(width, cap)


class SlotLayer(CacheLayerMixin):
    """One layer's keys/values ``[slots, kv_heads, width, head_dim]``, written in place.

    ``lazy_initialization``, ``update`` and the ``get_*`` methods are transformers'
    ``CacheLayerMixin`` protocol: the model's attention layers call them, not this project."""

    def __init__(self, slots: int, kv_heads: int, width: int, head_dim: int, dtype: torch.dtype, device: str):
        super().__init__()
        shape = (slots, kv_heads, width, head_dim)
        self.keys = self._k = torch.zeros(shape, dtype=dtype, device=device)
        self.values = self._v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = torch.arange(slots, device=device)
        self.write_pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.width = width
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocated up front (the shapes must never change)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple:
        """``key_states``/``value_states`` ``[rows, kv_heads, 1, head_dim]`` of the first ``rows`` slots go
        to ``write_pos`` ``[rows]``; returns those slots' whole cache (views; the mask hides what a slot
        may not see)."""
        rows = key_states.shape[0]
        self._k[self.rows[:rows], :, self.write_pos] = key_states[:, :, 0]
        self._v[self.rows[:rows], :, self.write_pos] = value_states[:, :, 0]
        return self._k[:rows], self._v[:rows]

    def load(self, rows: Tensor, keys: Tensor, values: Tensor) -> None:
        """A prompt's ``keys``/``values`` ``[1, kv_heads, len, head_dim]`` into positions ``0..len-1`` of ``rows``."""
        length = keys.shape[2]
        self._k[rows, :, :length] = keys.to(self._k.dtype)
        self._v[rows, :, :length] = values.to(self._v.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.width, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self) -> int:
        return self.width


class SlotCache(Cache):
    """A :class:`transformers.Cache` of :class:`SlotLayer`s for ``num_layers`` layers."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, width: int, head_dim: int, dtype, device):
        self.slot_layers = [SlotLayer(slots, kv_heads, width, head_dim, dtype, device) for _ in range(num_layers)]
        super().__init__(layers=list(self.slot_layers))
        self.slots, self.width = slots, width
        self._positions = torch.arange(width, device=device)

    @classmethod
    def for_config(cls, config, slots: int, width: int, dtype, device) -> SlotCache:
        """A cache for an HF model ``config``: its layers, KV heads and head size."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, slots, kv_heads, width, head_dim, dtype, device)

    def prefill(self, model, prompts: List[List[int]], slots: List[List[int]], *, pad_id: int) -> Tensor:
        """Run ``model`` once on up to :data:`PREFILL_ROWS` prompts of one :func:`prefill_width` ``W``, as
        ``[PREFILL_ROWS, W]`` right-padded ids (empty rows are all padding), and copy prompt ``i``'s
        keys/values into positions ``0..len_i-1`` of every slot in ``slots[i]``. Returns each prompt's
        last-position logits ``[len(prompts), V]``.

        Batch invariance, as in the decode step: the shapes are fixed by ``W`` alone, a causal model
        never lets a position see the padding after it, and the head always runs on
        ``PREFILL_ROWS x PREFILL_ROWS`` positions; so a prompt's logits and keys/values do not depend
        on the other prompts of its pass."""
        from transformers import DynamicCache

        lengths = [len(p) for p in prompts]
        width = prefill_width(max(lengths), self.width)
        if not 0 < len(prompts) <= PREFILL_ROWS or any(prefill_width(n, self.width) != width for n in lengths):
            raise ValueError(f"prefill: 1..{PREFILL_ROWS} prompts of one padded width, got lengths {lengths}")
        dev = self._positions.device
        ids = torch.full((PREFILL_ROWS, width), pad_id, dtype=torch.long, device=dev)
        last = torch.zeros(PREFILL_ROWS, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
            last[i] = len(p) - 1
        own = DynamicCache(config=model.config)
        # The model's own head (softcapping and all) at the PREFILL_ROWS last positions of every row:
        # logits [PREFILL_ROWS, PREFILL_ROWS, V], a fixed shape; prompt i's are at [i, i].
        logits = model(input_ids=ids, cache=own, use_cache=True, logits_to_keep=last).logits
        rows = [torch.tensor(s, dtype=torch.long, device=dev) for s in slots]
        for layer, src in zip(self.slot_layers, own.layers):
            for i, n in enumerate(lengths):
                layer.load(rows[i], src.keys[i : i + 1, :, :n], src.values[i : i + 1, :, :n])
        return torch.stack([logits[i, i] for i in range(len(prompts))])

    def move(self, src: List[int], dst: List[int]) -> None:
        """Copy the keys/values of slots ``src`` into slots ``dst``, pairwise, in every layer (the two
        lists share no slot)."""
        s, d = (torch.tensor(x, dtype=torch.long, device=self._positions.device) for x in (src, dst))
        for layer in self.slot_layers:
            layer._k[d] = layer._k[s]
            layer._v[d] = layer._v[s]

    def step_inputs(self, positions: Tensor) -> Tensor:
        """Point every layer's writes at ``positions`` ``[rows]`` (the first ``rows`` slots); the boolean
        attention mask ``[rows, 1, 1, width]`` (True: attend) that shows each slot ``0..positions[s]``."""
        for layer in self.slot_layers:
            layer.write_pos = positions
        return (self._positions[None, :] <= positions[:, None])[:, None, None, :]


def decode_logits(model, cache: SlotCache, ids: Tensor, positions: Tensor) -> Tensor:
    """One decode step of the first ``len(ids)`` slots: token ``ids[s]`` at ``positions[s]``; returns the
    logits ``[rows, V]`` (the keys/values go into the cache)."""
    mask = cache.step_inputs(positions)
    out = model(input_ids=ids[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache,
                use_cache=True)  # fmt: skip
    return out.logits[:, -1, :]


def batch_invariant_shapes(model, cache: SlotCache, vocab: int) -> List[int]:
    """The :func:`decode_shapes` of ``cache.slots`` under which a row's logits are bitwise what it gets
    in the full step, on this machine's kernels (``slots`` itself always). Probed on ``cache``, a
    scratch cache: random keys/values, tokens and positions, one full step, then each smaller shape
    on the same inputs. Accumulation orders do not depend on the data, so agreement on a probe of
    hundreds of random rows means the shapes agree on any rows."""
    g = torch.Generator().manual_seed(0)
    dev, slots = cache._positions.device, cache.slots
    for layer in cache.slot_layers:
        layer._k.copy_(torch.randn(layer._k.shape, generator=g).to(layer._k.dtype))
        layer._v.copy_(torch.randn(layer._v.shape, generator=g).to(layer._v.dtype))
    ids = torch.randint(vocab, (slots,), generator=g).to(dev)
    positions = torch.randint(cache.width, (slots,), generator=g).to(dev)
    with torch.no_grad():
        full = decode_logits(model, cache, ids, positions)
        same = lambda rows: torch.equal(decode_logits(model, cache, ids[:rows], positions[:rows]), full[:rows])  # noqa: E731
        return [rows for rows in decode_shapes(slots) if rows == slots or same(rows)]

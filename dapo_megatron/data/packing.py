"""Pure bin-packing of sequences into data-parallel ranks and micro-batches (no torch).

All functions take sequence lengths and return lists of *indices* into them; they are
deterministic (ties broken by index), so every rank computes the same plan from the same lengths.

* :func:`balance_across_ranks`: sequences -> DP ranks, groups kept together, tokens balanced.
* :func:`split_by_token_budget`: one rank's sequences -> micro-batches under a padded-token budget.
* :func:`equalize_microbatches`: make every rank run the same number of micro-batches (Megatron's
  pipeline schedule needs one ``num_microbatches`` on all DP ranks).
"""

from __future__ import annotations

from typing import List, Optional, Sequence


def _check_lengths(lengths: Sequence[int]) -> None:
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"sequence {i} has negative length {n}")


def padded_cost(lengths: Sequence[int], indices: Sequence[int]) -> int:
    """Tokens a micro-batch occupies once right-padded: ``len(indices) * max(lengths[indices])``."""
    return len(indices) * max((lengths[i] for i in indices), default=0)


def split_by_token_budget(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Pack sequences into micro-batches whose padded cost stays within ``max_tokens``.

    First-fit-decreasing: sequences are taken longest first (ties by index) and each goes into the
    first micro-batch that can still hold it, i.e. where ``(size + 1) * max_len <= max_tokens``
    (the micro-batch's ``max_len`` is its first, longest sequence). A sequence longer than
    ``max_tokens`` cannot share and gets a micro-batch of its own -- the only case in which a
    micro-batch exceeds the budget. Returns index lists in creation order, each longest first;
    every index appears exactly once. No sequences gives ``[]``.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    _check_lengths(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    bin_max: List[int] = []
    for i in order:
        n = lengths[i]
        for b, members in enumerate(bins):
            if (len(members) + 1) * bin_max[b] <= max_tokens:
                members.append(i)
                break
        else:
            bins.append([i])
            bin_max.append(n)
    return bins


def balance_across_ranks(lengths: Sequence[int], num_ranks: int, *, group_size: int = 1) -> List[List[int]]:
    """Split sequence indices over ``num_ranks`` data-parallel ranks, balancing total tokens.

    Indices ``[g * group_size, (g + 1) * group_size)`` form group ``g`` (e.g. the G responses of one
    prompt) and always land on the same rank. ``len(lengths)`` must be a multiple of ``group_size``.

    Count rule: with ``U`` groups and ``R`` ranks, every rank receives ``U // R`` or ``U // R + 1``
    groups, and exactly ``U % R`` ranks receive the extra one -- so when ``U`` is divisible by ``R``
    every rank gets the same number of sequences. Within that rule, groups are placed greedily,
    largest total tokens first (ties by group index), each on the rank with the fewest tokens so
    far (ties: fewer groups, then lower rank) that still has room. Each rank's indices are returned
    in ascending order, so groups stay contiguous. Ranks may be empty when ``U < R``.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if len(lengths) % group_size:
        raise ValueError(f"{len(lengths)} sequences cannot be split into groups of {group_size}")
    _check_lengths(lengths)
    num_groups = len(lengths) // group_size
    tokens = [sum(lengths[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    base, extra = divmod(num_groups, num_ranks)
    load = [0] * num_ranks
    count = [0] * num_ranks
    extra_used = 0
    groups: List[List[int]] = [[] for _ in range(num_ranks)]
    for g in sorted(range(num_groups), key=lambda g: (-tokens[g], g)):
        open_ranks = [r for r in range(num_ranks) if count[r] < base or (count[r] == base and extra_used < extra)]
        r = min(open_ranks, key=lambda r: (load[r], count[r], r))
        if count[r] == base:
            extra_used += 1
        groups[r].append(g)
        load[r] += tokens[g]
        count[r] += 1
    return [[g * group_size + j for g in sorted(gs) for j in range(group_size)] for gs in groups]


def equalize_microbatches(
    per_rank: Sequence[Sequence[Sequence[int]]],
    lengths: Optional[Sequence[int]] = None,
    *,
    multiple: int = 1,
) -> List[List[List[int]]]:
    """Give every rank the same number of micro-batches.

    The target count is the largest per-rank count, rounded up to a multiple of ``multiple`` and at
    least ``multiple`` (the interleaved pipeline schedule needs a multiple of the pipeline size; a
    set of ranks with no micro-batch at all still gets one empty each). A rank with fewer splits
    its costliest micro-batch holding two or more sequences (padded cost with ``lengths``, else
    sequence count; ties: first) into its first and second half, in place, until it reaches the
    target. When every micro-batch of a rank holds a single sequence, empty micro-batches ``[]``
    are appended -- the caller must fill those with a dummy row whose loss mask is zero.
    The input is not modified.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    result = [[list(mb) for mb in rank] for rank in per_rank]
    if not result:
        return result
    target = max(len(rank) for rank in result)
    target = max(multiple, -(-target // multiple) * multiple)

    def cost(mb: List[int]) -> int:
        return padded_cost(lengths, mb) if lengths is not None else len(mb)

    for rank in result:
        while len(rank) < target:
            splittable = [k for k, mb in enumerate(rank) if len(mb) > 1]
            if not splittable:
                rank.append([])
                continue
            k = max(splittable, key=lambda k: (cost(rank[k]), -k))
            mb = rank.pop(k)
            half = len(mb) // 2
            rank[k:k] = [mb[:half], mb[half:]]
    return result

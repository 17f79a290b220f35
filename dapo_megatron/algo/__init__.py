"""Pure DAPO math: tensors and scalars in, tensors and scalars out.

Imports torch only: never ``torch.distributed``, megatron or a config object. Reductions that span
micro-batches or ranks take the global counts as arguments (see :mod:`.policy_loss`).
"""

from dapo_megatron.algo.advantages import broadcast_to_tokens, group_advantages
from dapo_megatron.algo.dynamic_sampling import DynamicSamplingExhausted, GroupAccumulator, group_is_informative
from dapo_megatron.algo.entropy import entropy_from_logits, masked_mean, masked_sum
from dapo_megatron.algo.offpolicy import IS_LEVELS, IS_MODES, hist_edges, offpolicy_weights
from dapo_megatron.algo.overlong import overlong_filter_mask, overlong_penalty
from dapo_megatron.algo.policy_loss import AGG_MODES, aggregate_loss, policy_loss
from dapo_megatron.algo.staleness import StalenessHistogram, staleness_histogram
from dapo_megatron.algo.tis import tis_weights

__all__ = [
    "AGG_MODES",
    "DynamicSamplingExhausted",
    "GroupAccumulator",
    "IS_LEVELS",
    "IS_MODES",
    "StalenessHistogram",
    "aggregate_loss",
    "broadcast_to_tokens",
    "entropy_from_logits",
    "group_advantages",
    "group_is_informative",
    "hist_edges",
    "masked_mean",
    "masked_sum",
    "offpolicy_weights",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "staleness_histogram",
    "tis_weights",
]

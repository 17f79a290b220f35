"""Prompt data: datasets, the DAPO template, resumable sampling and sequence packing.

Light layer: stdlib and pyarrow only (pyarrow imported when a parquet file is read). Tokenizers are
passed in by the caller.
"""

from dapo_megatron.data.dataset import (
    CHARS_PER_TOKEN_BOUND,
    PromptDataset,
    PromptRow,
    eval_avg_at_k,
    iter_prompt_records,
    load_prompt_rows,
    parse_record,
)
from dapo_megatron.data.errors import (
    EVAL_ORIGIN,
    TRAIN_ORIGIN,
    DataError,
    DataFileError,
    DataOrigin,
    EmptyDatasetError,
    EmptyPromptError,
    MalformedRowError,
    PromptTooLongError,
)
from dapo_megatron.data.packing import (
    balance_across_ranks,
    equalize_microbatches,
    padded_cost,
    split_by_token_budget,
)
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.data.template import DAPO_TEMPLATE, DAPO_TEMPLATE_PREFIX, apply_template, format_dapo_prompt

__all__ = [
    "CHARS_PER_TOKEN_BOUND",
    "EVAL_ORIGIN",
    "TRAIN_ORIGIN",
    "DataError",
    "DataFileError",
    "DataOrigin",
    "EmptyDatasetError",
    "EmptyPromptError",
    "DAPO_TEMPLATE",
    "DAPO_TEMPLATE_PREFIX",
    "MalformedRowError",
    "PromptDataset",
    "PromptRow",
    "PromptTooLongError",
    "ResumableSampler",
    "apply_template",
    "balance_across_ranks",
    "equalize_microbatches",
    "eval_avg_at_k",
    "format_dapo_prompt",
    "iter_prompt_records",
    "load_prompt_rows",
    "padded_cost",
    "parse_record",
    "split_by_token_budget",
]

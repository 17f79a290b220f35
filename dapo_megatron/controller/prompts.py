"""Prompt sources for the rollout: dataset rows, tokenized once, drawn by a resumable sampler.

A source is a callable ``source(k) -> List[PromptItem]`` (what ``StreamingRollout.run`` asks for a
generation round). ``Group.prompt_index`` is the dataset row index, so a step's batch order (groups
sorted by it) is a function of which rows were drawn, not of which engine finished first.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from dapo_megatron.config import Config
from dapo_megatron.data.dataset import PromptDataset, iter_raw_records
from dapo_megatron.data.errors import EVAL_ORIGIN, TRAIN_ORIGIN, DataOrigin
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.rewards.base import MAX_GROUND_TRUTH_CHARS, check_ground_truth
from dapo_megatron.rollout.generator import PromptItem


def tokenize_all(
    dataset: PromptDataset, tokenizer: Any, *, apply_chat_template: bool, max_prompt_len: int
) -> List[List[int]]:
    """Prompt ids of every row (raises ``PromptTooLongError`` naming the first row over the limit)."""
    return [
        dataset.tokenize(i, tokenizer, apply_chat_template=apply_chat_template, max_prompt_len=max_prompt_len)
        for i in range(len(dataset))
    ]


def origin_of(files: Sequence[str], cfg: Config) -> DataOrigin:
    """Which config key lists ``files`` (quoted in data errors): ``data.eval_files`` when they are
    exactly the evaluation files (and not also the training files), else ``data.train_files``."""
    files = tuple(files)
    if files == tuple(cfg.data.eval_files) and files != tuple(cfg.data.train_files):
        return EVAL_ORIGIN
    return TRAIN_ORIGIN


def load_prompts(
    files: Sequence[str],
    tokenizer: Any,
    cfg: Config,
    *,
    dedup: bool = False,
    skip_malformed: bool = False,
    origin: Optional[DataOrigin] = None,
) -> Tuple[PromptDataset, List[List[int]]]:
    """Rows of ``files`` and their prompt ids, with ``cfg.data``'s template and chat-template choice and
    ``cfg.rollout.max_prompt_len`` as the bound (the one way train, eval and warm-up data are read).

    Prompts that cannot fit are refused by their length in characters before any is tokenized (a
    5 MB prompt took 21 s to tokenize only to be refused). With ``skip_malformed`` the rows over the
    bound (in characters, then in tokens) are left out like malformed rows; without it, the first
    one raises, naming its file and row. The result is never empty.
    """
    origin = origin or origin_of(files, cfg)
    bound = cfg.rollout.max_prompt_len
    data, _ = PromptDataset.from_files(list(files), dedup=dedup, template=cfg.data.template,
                                       skip_malformed=skip_malformed, max_prompt_len=bound, origin=origin)  # fmt: skip
    check_ground_truths(data, files)  # cheap, so before tokenizing
    if skip_malformed:
        data.filter_too_long(tokenizer, bound, apply_chat_template=cfg.data.apply_chat_template)
    ids = tokenize_all(data, tokenizer, apply_chat_template=cfg.data.apply_chat_template, max_prompt_len=bound)
    return data, ids


def check_ground_truths(dataset: PromptDataset, files: Sequence[str]) -> None:
    """Refuse a row whose ground truth exceeds the rewards' bound, naming its file and row.

    Rows do not record their file, so the (rare) error path re-reads ``files`` to find it.
    """
    for row in dataset.rows:
        if len(row.ground_truth) > MAX_GROUND_TRUTH_CHARS:
            check_ground_truth(row.ground_truth, where=_locate_ground_truth(files, row.ground_truth))


def _locate_ground_truth(files: Sequence[str], truth: str) -> str:
    for path in files:
        for n, _line, record in iter_raw_records(path):
            reward_model = record.get("reward_model") if isinstance(record, dict) else None
            if isinstance(reward_model, dict) and reward_model.get("ground_truth") == truth:
                return f"{path} row {n}"
    return f"a row of {', '.join(files)}"


class SampledPrompts:
    """``source(k)``: the next ``k`` rows of ``sampler`` as :class:`PromptItem` s (epochs wrap)."""

    def __init__(self, dataset: PromptDataset, prompt_ids: List[List[int]], sampler: ResumableSampler):
        if len(prompt_ids) != len(dataset):
            raise ValueError(f"SampledPrompts: {len(prompt_ids)} tokenized prompts for {len(dataset)} rows")
        self.dataset, self.prompt_ids, self.sampler = dataset, prompt_ids, sampler

    def __call__(self, k: int) -> List[PromptItem]:
        return [self.item(i) for i in self.sampler.next_indices(k)]

    def item(self, i: int) -> PromptItem:
        row = self.dataset[i]
        meta = {"data_source": row.data_source, "problem_key": row.problem_key}
        return PromptItem(i, list(self.prompt_ids[i]), row.ground_truth, meta)

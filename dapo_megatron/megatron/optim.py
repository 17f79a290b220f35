"""megatron-core's optimizer and learning-rate schedule, built from :class:`OptimConfig`.

Units: the config's ``lr_warmup_steps`` is in **rollout steps**; the scheduler counts **optimizer
updates**. One rollout step makes ``updates_per_step`` updates (mini-batches x ppo_epochs), so the
warm-up is ``lr_warmup_steps * updates_per_step`` updates.

Schedule convention: update ``u`` (1-based) uses ``lr * min(1, u / warmup_updates)`` during
warm-up. Megatron's scheduler gives ``init_lr`` (0) at its step 0, so we advance it by one at
build time; otherwise the very first update of a run would have lr 0 and do nothing.

Weight decay is AdamW-style decoupled: ``OptimizerConfig.decoupled_weight_decay`` defaults to True
in 0.16.1 (torch ``AdamW`` on CPU, TE/apex FusedAdam with ``adam_w_mode`` on GPU), and we set it
explicitly. Megatron's default parameter groups exclude biases and norm weights from decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch

from dapo_megatron.config import OptimConfig


@dataclass
class OptimizerBundle:
    """The megatron optimizer and its scheduler. ``scheduler.num_steps - 1`` updates have run."""

    optimizer: Any
    scheduler: Any
    warmup_updates: int
    decay_updates: int

    @property
    def lr(self) -> float:
        """The learning rate the next update will use (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])


def optimizer_config(optim_cfg: OptimConfig, *, params_dtype: torch.dtype, use_distributed_optimizer: bool):
    """megatron ``OptimizerConfig`` for Adam(W) with our hyper-parameters and dtype flags."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        decoupled_weight_decay=True,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )


def build_optimizer(
    model_chunks: List[Any],
    optim_cfg: OptimConfig,
    *,
    params_dtype: torch.dtype,
    use_distributed_optimizer: bool,
    total_updates: int,
    updates_per_step: int,
) -> OptimizerBundle:
    """Build megatron's optimizer over the DDP-wrapped ``model_chunks`` and its lr scheduler.

    ``total_updates`` (>= 1) is the decay horizon for ``linear``/``cosine``; after it the lr is
    ``min_lr``. ``clip_grad == 0`` disables clipping (megatron skips clipping for values <= 0).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if total_updates < 1 or updates_per_step < 1:
        raise ValueError(f"build_optimizer: total_updates={total_updates}, updates_per_step={updates_per_step}")
    cfg = optimizer_config(optim_cfg, params_dtype=params_dtype, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(cfg, model_chunks)
    warmup = optim_cfg.lr_warmup_steps * updates_per_step
    # megatron asserts warmup < decay steps even for the constant style.
    decay = max(total_updates, warmup + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    scheduler.step(1)  # update 1 uses lr * 1/warmup, not init_lr (see module docstring)
    return OptimizerBundle(optimizer=optimizer, scheduler=scheduler, warmup_updates=warmup, decay_updates=decay)

"""The Megatron actor: log-probs, DAPO updates and supervised updates on megatron-core.

One :class:`MegatronActor` lives on every trainer rank (SPMD). Every public method is collective.
A step reaches the actor as each rank's :class:`~dapo_megatron.megatron.dispatch.StepShard` (rank 0
plans it and sends each DP replica only its rows: :meth:`MegatronActor.dispatch`), or as the full
batch held by every rank; all ranks return the same metrics.

Path of one update (architecture habit 3: loop -> ``train_step`` -> schedule -> ``algo`` loss)::

    plan_minibatches          rows of this DP rank, equal micro-batch count, global denominators
    get_forward_backward_func megatron's (pipelined) schedule over the micro-batches
      forward_step            GPTModel -> logits shard [b, t, V/tp]
      loss_func               token_logprobs_and_entropy -> policy_loss -> aggregate_loss
                              -> scale_loss (the one loss-scaling function)
    finalize_model_grads      DDP grad all-reduce over DP (x 1/dp), embedding/PP syncs
    NaN/inf guard, optimizer.step(), finite-weights check, scheduler.step()

Shapes follow :mod:`dapo_megatron.types`: batch tensors ``[B, T]`` target-aligned; log-prob and
entropy of position ``t`` come from the logits at ``t - 1``; position 0 and padding get 0.

Not supported here: context parallelism (CP > 1 needs per-rank sequence slicing of the batch);
the constructor refuses it.
"""

from __future__ import annotations

import importlib.util
import math
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dapo_megatron.algo.policy_loss import aggregate_loss, policy_loss
from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig
from dapo_megatron.megatron.batching import MicroBatch, MiniBatchPlan, plan_minibatches
from dapo_megatron.megatron.dispatch import StepShard, dispatch_step, plan_step
from dapo_megatron.megatron.loss_scaling import CALCULATE_PER_TOKEN_LOSS, scale_loss
from dapo_megatron.megatron.moe_replay import check_replay_support, replay_scope
from dapo_megatron.megatron.moe_stats import MoEStepStats
from dapo_megatron.megatron.offload import StateOffloader, grad_tensors, model_tensors, optimizer_tensors
from dapo_megatron.megatron.offpolicy import accumulate, is_metrics, is_weights, reduce_stats, stat_keys
from dapo_megatron.megatron.optim import build_optimizer
from dapo_megatron.megatron.token_padding import pad_for_schedule, sequence_multiple
from dapo_megatron.types import TrainBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sums reduced over DP and PP after every update (order is the wire format of the all-reduce).
_SUM_KEYS = (
    "loss", "pg_loss", "entropy_sum", "clip_high_sum", "clip_low_sum", "dual_clip_sum",
    "approx_kl_sum", "ratio_sum", "num_tokens",
)  # fmt: skip


class NonFiniteWeightsError(RuntimeError):
    """The weights hold inf or nan. Raised on every rank at once (the verdict is all-reduced), by the
    update that produced them or by the checkpoint save that would have written them."""


def check_actor_support(topology: Any, model_cfg: ModelConfig) -> None:
    """Raise a clear error for settings this actor cannot run, before any model is built."""
    if getattr(topology, "cp", 1) > 1:
        raise NotImplementedError("MegatronActor: context parallelism (parallel.context > 1) is not supported yet")
    if model_cfg.fp8 is not None:
        if importlib.util.find_spec("transformer_engine") is None:
            raise RuntimeError(
                f"model.fp8={model_cfg.fp8!r} needs NVIDIA Transformer Engine, which is not installed; "
                "install transformer_engine (GPU only) or set model.fp8=null"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.fp8={model_cfg.fp8!r} needs CUDA; no GPU is visible")


class MegatronActor:
    """Megatron model chunks + DDP + optimizer + scheduler for one trainer rank.

    Args:
        spec: :class:`dapo_megatron.megatron.model.ModelSpec` of the architecture.
        topology: :class:`dapo_megatron.parallel.topology.Topology`; megatron's parallel state must
            already be initialised to it (``parallel.init.init_model_parallel``).
        model_cfg / optim_cfg / train_cfg / algo_cfg: the sub-configs.
        max_response_len: L_max, used by the ``seq-mean-token-sum-norm`` aggregation.
        total_steps: rollout steps of the run (the lr decay horizon).
        prompts_per_step: prompt groups per rollout step; with ``train_cfg.ppo_mini_batch_size``
            and ``ppo_epochs`` it gives the updates per step.
        group_size: responses per prompt (G); informational (batches carry ``seq_group``).
        use_distributed_optimizer: shard optimizer state over DP (``parallel.use_distributed_optimizer``).
        sequence_parallel: megatron sequence parallelism (``parallel.sequence_parallel``; TP > 1, TE).
    """

    def __init__(
        self,
        spec: Any,
        topology: Any,
        *,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        train_cfg: TrainConfig,
        algo_cfg: AlgoConfig,
        max_response_len: int,
        total_steps: int,
        prompts_per_step: int,
        group_size: int,
        use_distributed_optimizer: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        check_actor_support(topology, model_cfg)  # before any import of megatron or model build
        check_replay_support(algo_cfg.routing_replay, spec.moe, model_cfg.recompute_granularity)
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from dapo_megatron.megatron.model import build_model_chunks

        self.spec, self.topology = spec, topology
        self.model_cfg, self.optim_cfg, self.train_cfg, self.algo_cfg = model_cfg, optim_cfg, train_cfg, algo_cfg
        self.max_response_len, self.group_size = max_response_len, group_size
        self.params_dtype = _DTYPES[model_cfg.params_dtype]
        self.use_distributed_optimizer = use_distributed_optimizer
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        chunks = build_model_chunks(spec, topology, model_cfg, sequence_parallel=sequence_parallel)
        self._chunks = list(chunks)
        self._moe_stats = MoEStepStats(self._chunks) if spec.moe is not None else None  # moe/* step metrics
        self._fixed_shapes = topology.vpp > 1
        # Every micro-batch's column count is padded to this (FP8 GEMM alignment, SP split; token_padding).
        self.seq_multiple = sequence_multiple(
            fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe, sequence_parallel=sequence_parallel, tp=topology.tp
        )
        self._configure_schedule(self._chunks[0].config)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
        )
        self._ddp = [
            DistributedDataParallel(c.config, ddp_cfg, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)
        ]
        updates = math.ceil(prompts_per_step / train_cfg.ppo_mini_batch_size) * train_cfg.ppo_epochs
        self._opt = build_optimizer(
            self._ddp,
            optim_cfg,
            params_dtype=self.params_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
            total_updates=max(1, total_steps * updates),
            updates_per_step=updates,
        )
        self._ps = ps
        self._offloader = StateOffloader(self._device or torch.device("cpu"))  # colocated rollouts
        self.skipped_updates_total = 0
        self.updates_applied = 0  # optimizer steps taken (checkpoint.py: optimizer state exists iff > 0)
        self.rng_restored = False  # set by checkpoint.load_checkpoint

    # ------------------------------------------------------------------ properties
    @property
    def model_chunks(self) -> List[Any]:
        """The unwrapped GPTModels of this rank, one per virtual pipeline stage."""
        return self._chunks

    @property
    def ddp_chunks(self) -> List[Any]:
        return self._ddp

    @property
    def optimizer(self) -> Any:
        return self._opt.optimizer

    @property
    def scheduler(self) -> Any:
        return self._opt.scheduler

    # ------------------------------------------------------------------ colocated memory
    def offload(self, parts: tuple = ("optimizer", "grads", "params")) -> int:
        """Move ``parts`` of this rank's state to host memory (:mod:`dapo_megatron.megatron.offload`),
        then ``empty_cache``. Returns the device bytes freed by this call. Local (no collective).

        The weight sync reads the parameters, so it runs between ``offload(("optimizer", "grads"))``
        and ``offload(("params",))``: optimizer storages that *are* parameter storages (FP32Optimizer's
        params, the distributed optimizer's fp32 shards) stay with the parameters. Gradients are
        freed without a copy (every update zeroes them first); reload zero-fills them.
        """
        params, freed, off = model_tensors(self._ddp), 0, self._offloader
        if "optimizer" in parts:
            freed += off.offload(optimizer_tensors(self.optimizer), skip=params)
        if "grads" in parts:
            freed += off.offload(grad_tensors(self._ddp, self.optimizer), keep_contents=False, skip=params)
        if "params" in parts:
            freed += off.offload(params)
        if self._device is not None:
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver, for the engines
        return freed

    def reload(self) -> int:
        """Bring everything :meth:`offload` moved back onto the device, in place. Returns bytes."""
        return self._offloader.reload()

    @property
    def offloaded_bytes(self) -> int:
        """Device bytes currently held in host memory (0: all state on the device)."""
        return self._offloader.held_bytes

    def _require_on_device(self, what: str) -> None:
        if self._offloader.held_bytes:
            raise RuntimeError(f"MegatronActor.{what}: {self._offloader.held_bytes} bytes of trainer state are "
                               "offloaded to host memory (colocated rollout); call reload() first")  # fmt: skip

    # ------------------------------------------------------------------ setup helpers
    def _configure_schedule(self, config: Any) -> None:
        """Settings of the shared TransformerConfig that the schedule reads at run time."""
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
        config.calculate_per_token_loss = CALCULATE_PER_TOKEN_LOSS  # loss_scaling.py assumes it
        # Micro-batches are trimmed to their own length, so PP must exchange tensor shapes -- except
        # with the interleaved schedule (VPP > 1). There megatron 0.16's shape exchange breaks: at
        # PP=2 (previous stage == next stage) it posts two same-direction messages to one peer in an
        # order the receiver does not mirror, so activation and grad shapes get swapped; at PP=4 it
        # deadlocked against the unbatched tensor exchange (both seen on gloo). So with VPP all
        # micro-batches of a schedule call are padded to one shape, and p2p is unbatched (it orders
        # sends/recvs by rank parity, exact also when prev == next).
        config.variable_seq_lengths = not self._fixed_shapes
        if self._fixed_shapes:
            config.batch_p2p_comm = False

    def _dp(self) -> tuple:
        ps = self._ps
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()

    def _plans(self, batch: TrainBatch, old_logprobs, prompts_per_update) -> List[MiniBatchPlan]:
        dp_rank, dp_size, _ = self._dp()
        return plan_minibatches(
            batch,
            old_logprobs=old_logprobs,
            dp_rank=dp_rank,
            dp_size=dp_size,
            prompts_per_update=prompts_per_update,
            micro_batch_size=self.train_cfg.micro_batch_size,
            max_tokens_per_microbatch=self.train_cfg.max_tokens_per_microbatch,
            microbatch_multiple=self.topology.pp if self.topology.vpp > 1 else 1,
        )

    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        if self._device is None:
            return mb
        return MicroBatch(**{k: v if (v := getattr(mb, k)) is None else v.to(self._device, non_blocking=True)
                             for k in mb.__dataclass_fields__})  # fmt: skip

    # ------------------------------------------------------------------ the schedule
    def _token_logprobs(self, logits: Tensor, mb: MicroBatch, temperature: float, entropy: bool) -> tuple:
        """Target-aligned ``[b, t]`` log-probs (and entropy or None) from the logits shard ``[b, t, V/tp]``."""
        from dapo_megatron.megatron.logprobs import token_logprobs_and_entropy

        # Every position of the contiguous logits, each scored against the next token (the last one
        # against a dummy, the row's first token, and dropped): ``logits[:, :-1]`` is not contiguous,
        # so the kernel would walk it one sequence at a time, hundreds of tiny passes per micro-batch.
        lp, ent = token_logprobs_and_entropy(
            logits,
            torch.roll(mb.tokens, -1, dims=1),
            temperature=temperature,
            chunk_size=self.train_cfg.logprob_chunk_size,
            tp_group=self._ps.get_tensor_model_parallel_group(),
            compute_entropy=entropy,
            valid_vocab_size=self.spec.vocab_size,
        )
        lp = F.pad(lp[:, :-1], (1, 0))
        return lp, (F.pad(ent[:, :-1], (1, 0)) if entropy else None)

    def _run_schedule(self, plan: MiniBatchPlan, make_loss_func: Callable, *, forward_only: bool) -> None:
        """Run megatron's schedule over ``plan``; ``make_loss_func(mb)`` gives each loss_func.

        The forward-step closure: feeds one micro-batch to the model chunk (pre-process stages use
        the tokens, later stages the received activations) and binds the loss to that micro-batch,
        so results are placed by ``mb.rows`` whatever order the schedule runs them in.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._require_on_device("forward/backward")
        mbs = pad_for_schedule(plan.microbatches, multiple=self.seq_multiple, same_shape=self._fixed_shapes)
        mbs = [self._to_device(mb) for mb in mbs]

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            b, t = mb.tokens.shape
            positions = torch.arange(t, device=mb.tokens.device).unsqueeze(0).expand(b, -1)
            with replay_scope(model, mb.routed_experts, self.algo_cfg.routing_replay == "rollout"):  # R3
                output = model(mb.tokens, positions, None)  # None: the causal mask (right padding only)
            return output, make_loss_func(mb)

        iterators = [iter(mbs) for _ in self._ddp]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self._ddp,
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs),
            micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=forward_only,
        )

    # ------------------------------------------------------------------ loss functions
    def _policy_loss_func(self, mb: MicroBatch, acc: Dict, *, plan: MiniBatchPlan, temperature: float) -> Callable:
        """loss_func for one DAPO micro-batch: adds detached masked sums into ``acc``."""
        algo = self.algo_cfg
        mode = algo.loss_agg_mode
        agg = partial(
            aggregate_loss,
            mode=mode,
            global_num_tokens=plan.global_num_tokens,
            global_num_seqs=plan.global_num_seqs,
            max_response_len=self.max_response_len,
        )

        def loss_func(logits: Tensor):
            lp, ent = self._token_logprobs(logits, mb, temperature, entropy=True)
            weights, is_stats = is_weights(mb, algo.tis)  # pi_old / pi_rollout (None when algo.tis is off)
            per_token, stats = policy_loss(
                lp, mb.old_logprobs, mb.advantages, mb.loss_mask,
                clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
                clip_ratio_c=algo.clip_ratio_c, log_ratio_clamp=algo.log_ratio_clamp, tis_weights=weights,
            )  # fmt: skip
            pg = agg(per_token, mb.loss_mask)
            loss = pg - algo.entropy_coeff * agg(ent, mb.loss_mask) if algo.entropy_coeff > 0 else pg
            mask = mb.loss_mask != 0
            stats.update(is_stats)
            _accumulate(acc, stats, loss=loss, pg_loss=pg, entropy_sum=torch.where(mask, ent, 0.0).sum())
            return scale_loss(loss, plan.num_microbatches, self.topology.dp), {}

        return loss_func

    def _sft_loss_func(self, mb: MicroBatch, acc: Dict, *, plan: MiniBatchPlan) -> Callable:
        """loss_func of token-mean cross-entropy over ``loss_mask`` (global token denominator)."""

        def loss_func(logits: Tensor):
            lp, _ = self._token_logprobs(logits, mb, 1.0, entropy=False)
            mask = mb.loss_mask != 0
            nll_sum = -torch.where(mask, lp, 0.0).sum()
            loss = nll_sum / max(plan.global_num_tokens, 1.0)
            _accumulate(acc, {"num_tokens": mask.sum().to(lp.dtype)}, loss=loss)
            return scale_loss(loss, plan.num_microbatches, self.topology.dp), {}

        return loss_func

    def _logprob_func(self, mb: MicroBatch, out: Tensor, temperature: float) -> Callable:
        """forward-only loss_func: writes the micro-batch's log-probs into rows of ``out`` ``[B, T]``."""

        def loss_func(logits: Tensor):
            lp, _ = self._token_logprobs(logits, mb, temperature, entropy=False)
            keep = mb.rows >= 0
            t = min(lp.shape[1], out.shape[1])  # padded columns may run past the batch's T
            out[mb.rows[keep].cpu(), :t] = lp[keep, :t].detach().float().cpu()
            return lp.new_zeros(()), {}

        return loss_func

    # ------------------------------------------------------------------ collectives
    def _reduce_stats(self, acc: Dict) -> Dict[str, float]:
        """Sum ``acc`` over DP, then over PP (only the last stage holds values); max/min for the peaks."""
        groups = (self._ps.get_data_parallel_group(), self._ps.get_pipeline_model_parallel_group())
        keys = stat_keys(_SUM_KEYS, ("ratio_max",), self.algo_cfg.tis)
        return reduce_stats(acc, keys, groups=groups, device=self._device or torch.device("cpu"))

    def _grads_nonfinite(self) -> bool:
        """True on every rank when any rank holds a non-finite gradient (after the DP reduction)."""
        bad = torch.zeros(1, device=self._device or torch.device("cpu"))
        for chunk in self._ddp:
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                if g is not None and not bool(torch.isfinite(g).all()):
                    bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() > 0)

    def _local_weights_finite(self) -> bool:
        """This rank's parameters are all finite: one fused max-|w| over them (a NaN propagates to it)."""
        params = [p.detach() for chunk in self._ddp for p in chunk.parameters()]
        if not params:
            return True
        peak = torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))]).max()
        return bool(torch.isfinite(peak))

    def check_weights_finite(self, what: str, advice: str = "") -> None:
        """Collective: raise :class:`NonFiniteWeightsError` on every rank when any rank holds an inf/nan
        weight. Reduced over the whole trainer world: TP/PP shards differ, and one bad shard poisons all."""
        self._require_on_device("check_weights_finite")
        bad = torch.tensor([0.0 if self._local_weights_finite() else 1.0], device=self._device or torch.device("cpu"))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            raise NonFiniteWeightsError(f"{what}: the weights hold inf or nan on at least one rank{advice}")

    def _zero_grads(self) -> None:
        for chunk in self._ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _step_and_check(self, lr: float) -> tuple:
        """``optimizer.step()``, then the check that it left every weight finite on every rank.

        Gradients are finite here, yet a huge lr (or lr * weight_decay) can overflow the weights; every
        later forward would be nan and every checkpoint poisoned, so the run stops with the named error.
        """
        what = f"update {self.updates_applied + 1} (lr={lr:g})"
        advice = (
            f"; the update overflowed {self.params_dtype} although every gradient was finite: lower optim.lr "
            "(or optim.weight_decay). The run stops here, before any checkpoint of these weights is saved"
        )
        try:
            stepped, grad_norm, _ = self.optimizer.step()
        except RuntimeError as e:
            # torch's Adam refuses a step size that overflows float32, after its decoupled weight decay
            # may already have written inf into the weights: the same failure, named. Checked locally,
            # as another rank may not have raised (no collective on this path).
            if self._local_weights_finite():
                raise
            raise NonFiniteWeightsError(f"{what}: the weights hold inf or nan on this rank{advice}") from e
        self.check_weights_finite(what, advice)  # one fused norm per update, one all-reduce
        return stepped, grad_norm

    def _guarded_step(self, loss_finite: bool) -> tuple:
        """Optimizer step unless the loss or any grad is non-finite. Returns ``(stepped, grad_norm, lr)``.

        megatron reports a failed update only for fp16 (its loss scaler); for fp32/bf16 we check the
        grads ourselves *before* stepping, so a skipped update leaves weights and Adam state as they
        were. fp16 keeps megatron's own check so its loss scaler still backs off.
        """
        lr = self._opt.lr
        if self.params_dtype != torch.float16 and (not loss_finite or self._grads_nonfinite()):
            self._zero_grads()
            return False, float("nan"), lr
        stepped, grad_norm = self._step_and_check(lr)
        if stepped:
            if grad_norm is None:  # clip_grad == 0: megatron did not compute it
                grad_norm = self.optimizer.get_grad_norm()
            self.scheduler.step(1)
            self.updates_applied += 1
        return bool(stepped), float(grad_norm) if stepped else float("nan"), lr

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch, *, temperature: float) -> Tensor:
        """Log-probs ``[B, T]`` (float32, target-aligned) of ``batch.tokens`` under the current weights.

        Forward-only through the schedule. Position 0 holds 0, as do positions past the longest row
        of a row's micro-batch; right-padding positions inside it hold the log-prob of the pad token
        (every consumer masks them). The result is the same on every rank: the last PP stage fills
        its DP rows, then a sum over DP and PP.
        """
        for m in self._ddp:
            m.eval()
        out = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        for plan in self._plans(batch, None, None):
            self._run_schedule(plan, lambda mb: self._logprob_func(mb, out, temperature), forward_only=True)
        for m in self._ddp:
            m.train()
        wire = out.to(self._device) if self._device is not None else out
        for group in (self._ps.get_data_parallel_group(), self._ps.get_pipeline_model_parallel_group()):
            dist.all_reduce(wire, group=group)
        return wire.cpu()

    def plan_step(self, batch: TrainBatch) -> List[StepShard]:
        """Every DP replica's :class:`StepShard` of ``batch`` (pure; rank 0 plans for all)."""
        return plan_step(
            batch, dp_size=self._dp()[1], prompts_per_update=self.train_cfg.ppo_mini_batch_size,
            micro_batch_size=self.train_cfg.micro_batch_size,
            max_tokens_per_microbatch=self.train_cfg.max_tokens_per_microbatch,
            microbatch_multiple=self.topology.pp if self.topology.vpp > 1 else 1,
            use_rollout_logprobs=self.algo_cfg.use_rollout_logprobs,
        )  # fmt: skip

    def dispatch(self, batch: Optional[TrainBatch]) -> StepShard:
        """Collective: this rank's shard of global rank 0's ``batch`` (``None`` on other ranks).
        Each DP replica receives only its rows (see ``megatron/dispatch.py``)."""
        ps = self._ps
        mp_group = ps.get_model_parallel_group()
        return dispatch_step(
            batch, self.plan_step, dp_rank=ps.get_data_parallel_rank(),
            dp_sources=dist.get_process_group_ranks(ps.get_data_parallel_group()),
            mp_group=mp_group, mp_ranks=dist.get_process_group_ranks(mp_group),
            device=self._device or torch.device("cpu"),
        )  # fmt: skip

    @torch.no_grad()
    def fill_old_logprobs(self, shard: StepShard, *, temperature: float) -> None:
        """Recompute pi_old into ``shard``'s micro-batches, on this rank's rows only, with the very
        micro-batches the updates use. The last PP stage fills them (other stages compute no loss)."""
        for m in self._ddp:
            m.eval()
        out = torch.zeros((max(shard.num_local_rows, 1), max(mb.tokens.shape[1] for mb in shard.microbatches)))
        for plan in shard.plans:  # _logprob_func writes out[local row] (MicroBatch.rows are local)
            self._run_schedule(plan, lambda mb: self._logprob_func(mb, out, temperature), forward_only=True)
        for m in self._ddp:
            m.train()
        for mb in shard.microbatches:
            if int(mb.rows[0]) >= 0:  # a dummy micro-batch keeps its zeros
                mb.old_logprobs = out[mb.rows.cpu(), : mb.tokens.shape[1]].to(mb.tokens.device)
        shard.old_from = "recomputed"

    def _update(self, plan: MiniBatchPlan, make_loss_func: Callable, times: Dict) -> Dict[str, float]:
        """One optimizer update over ``plan``: zero grads, schedule, reduce stats, guarded step."""
        self._zero_grads()
        acc: Dict[str, Any] = {}
        start = time.perf_counter()
        self._run_schedule(plan, lambda mb: make_loss_func(mb, acc), forward_only=False)
        stats = self._reduce_stats(acc)
        mid = time.perf_counter()
        stepped, grad_norm, lr = self._guarded_step(math.isfinite(stats["loss"]))
        times["time_fwd_bwd_s"] = times.get("time_fwd_bwd_s", 0.0) + mid - start
        times["time_optimizer_s"] = times.get("time_optimizer_s", 0.0) + time.perf_counter() - mid
        if not stepped:
            self.skipped_updates_total += 1
        return {**stats, "grad_norm": grad_norm, "stepped": float(stepped), "lr": lr}

    def train_step(self, batch: TrainBatch | StepShard, *, temperature: float) -> Dict[str, float]:
        """DAPO updates over one rollout step: ``ppo_epochs`` passes over its mini-batches.

        ``batch``: this rank's :class:`StepShard` (from :meth:`dispatch`), or the full batch held by
        every rank (planned here, no communication). Old log-probs: ``rollout_logprobs`` when
        ``algo_cfg.use_rollout_logprobs``, else the batch's ``old_logprobs``, else recomputed here
        on this rank's rows. Returns the same dict on every rank (see :func:`summarize_updates`).
        """
        start = time.perf_counter()
        times: Dict[str, float] = {}
        if self._moe_stats is not None:
            self._moe_stats.reset()  # counts this step's training forwards only
        shard = batch if isinstance(batch, StepShard) else self.plan_step(batch)[self._dp()[0]]
        if shard.old_from == "recompute":
            self.fill_old_logprobs(shard, temperature=temperature)
            times["time_logprob_s"] = time.perf_counter() - start
        updates = []
        for _ in range(self.train_cfg.ppo_epochs):
            for plan in shard.plans:
                make = partial(self._policy_loss_func, plan=plan, temperature=temperature)
                updates.append(self._update(plan, make, times))
        times["time_total_s"] = time.perf_counter() - start
        moe = self._moe_stats.reduce() if self._moe_stats is not None else {}
        return {**summarize_updates(updates, shard.num_tokens), **moe, **times}

    def sft_step(self, tokens: Tensor, loss_mask: Tensor) -> Dict[str, float]:
        """One supervised update: token-mean cross-entropy of ``tokens`` ``[B, T]`` where ``loss_mask``.

        ``loss_mask`` is target-aligned like every per-token tensor. Returns ``loss``, ``grad_norm``,
        ``lr``, ``num_tokens``, ``skipped_updates``, ``updates`` and times.
        """
        start = time.perf_counter()
        zeros = torch.zeros(loss_mask.shape, dtype=torch.float32)
        batch = TrainBatch(
            tokens=tokens, loss_mask=loss_mask.float(), advantages=zeros, rollout_logprobs=zeros,
            seq_group=torch.arange(tokens.shape[0]),
        )  # fmt: skip
        (plan,) = self._plans(batch, None, None)
        times: Dict[str, float] = {}
        upd = self._update(plan, partial(self._sft_loss_func, plan=plan), times)
        times["time_total_s"] = time.perf_counter() - start
        return {
            "loss": upd["loss"], "grad_norm": upd["grad_norm"], "lr": upd["lr"], "num_tokens": upd["num_tokens"],
            "skipped_updates": 1.0 - upd["stepped"], "updates": 1.0, **times,
        }  # fmt: skip


def _accumulate(acc: Dict, stats: Dict[str, Tensor], **extra: Tensor) -> None:
    """Add detached per-micro-batch sums into ``acc`` (``*_max`` by max, ``*_min`` by min)."""
    accumulate(acc, {**stats, **extra})


def summarize_updates(updates: List[Dict[str, float]], num_tokens: float) -> Dict[str, float]:
    """Step metrics from per-update global stats.

    ``loss``/``grad_norm``: means over updates (grad_norm over the applied ones; nan if none).
    Fractions, ``approx_kl``, ``ratio_mean``, ``entropy``: token-weighted over all updates.
    ``lr``: of the last update. ``num_tokens``: response tokens of the whole step (the argument).
    """
    tokens = max(sum(u["num_tokens"] for u in updates), 1.0)
    applied = [u["grad_norm"] for u in updates if u["stepped"]]
    return {
        "loss": sum(u["loss"] for u in updates) / max(len(updates), 1),
        "pg_loss": sum(u["pg_loss"] for u in updates) / max(len(updates), 1),
        "grad_norm": sum(applied) / len(applied) if applied else float("nan"),
        "clip_frac_high": sum(u["clip_high_sum"] for u in updates) / tokens,
        "clip_frac_low": sum(u["clip_low_sum"] for u in updates) / tokens,
        "dual_clip_frac": sum(u["dual_clip_sum"] for u in updates) / tokens,
        "approx_kl": sum(u["approx_kl_sum"] for u in updates) / tokens,
        "ratio_mean": sum(u["ratio_sum"] for u in updates) / tokens,
        "ratio_max": max((u["ratio_max"] for u in updates), default=0.0),
        "entropy": sum(u["entropy_sum"] for u in updates) / tokens,
        "lr": updates[-1]["lr"] if updates else float("nan"),
        "num_tokens": float(num_tokens),
        "skipped_updates": float(sum(1 for u in updates if not u["stepped"])),
        "updates": float(len(updates)),
        **is_metrics(updates, tokens),
    }

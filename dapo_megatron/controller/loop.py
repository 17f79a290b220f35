"""The DAPO training loop (Algorithm 1 of the paper), one step per iteration.

The loop body is kept to one screen; each step helper below does one numbered thing. Trainer
rank 0 drives the engines and plans each batch; every DP replica receives only its rows, every rank
trains and joins the weight sync.

Asynchronous DAPO (``rollout.max_staleness`` K >= 1) keeps this order: ``collect_groups`` takes the
batch from the rollout producer (``rollout/producer.py``), which has been generating it, within the
staleness bound, while the actor trained the previous step; ``sync_engines`` pauses the producer
(in-flight responses keep their tokens and continue after the update).
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dapo_megatron.config import Config
from dapo_megatron.controller.batch import build_train_batch, reward_metrics
from dapo_megatron.controller.evaluate import eval_sampling, evaluate
from dapo_megatron.controller.heap import release_free_heap
from dapo_megatron.controller.run_dir import RunLock
from dapo_megatron.controller.session import TrainingSession, metrics_of
from dapo_megatron.controller.weight_sync import push_weights
from dapo_megatron.megatron.dispatch import StepShard, gap_stats
from dapo_megatron.observability.timers import PhaseTimer
from dapo_megatron.parallel.rank0_wait import rank0_then_all, world_store
from dapo_megatron.rollout.generator import dump_groups, load_groups
from dapo_megatron.types import Group

ROLLOUT_FILE = "step_{}.jsonl"  # one dumped step (run.dump_rollouts), read back by run.replay_rollouts


def train(cfg: Config, *, console: bool = True, run_lock: Optional[RunLock] = None) -> Dict[str, float]:
    """Run DAPO from the last checkpoint (or the start) to ``train.total_steps``.

    ``run_lock``: the run folder's lock when the caller (``demo``) already holds it.

    Crash safety of ``metrics.jsonl``: a step's line is written (and fsynced) before its checkpoint
    is published, and a resume cuts the file back to the restored step (``TrainingSession``). So
    after a crash anywhere in a step and a resume, every step has exactly one line, in order.
    Returns the metrics of the last step on rank 0 (``{}`` on other ranks, or when nothing ran).
    """
    last: Dict[str, float] = {}
    with TrainingSession(cfg, console=console, run_lock=run_lock) as s:
        sync_engines(s, version=s.start_step)  # engines serve the restored (or initial) policy
        if s.start_step == 0 and cfg.run.eval_every > 0 and not cfg.run.replay_rollouts:
            log_step(s, 0, run_eval(s, 0))  # the "before" accuracy
        for step in range(s.start_step + 1, cfg.train.total_steps + 1):
            timer = PhaseTimer()
            with timer("generate"):
                groups, stats = collect_groups(s, step)  # 1-2: streaming rollout, dynamic sampling, reward + overlong
            batch = make_batch(s, groups)  # 3: group-relative advantages; each DP replica gets its rows
            with timer("logprob"):
                stats.update(old_logprobs(s, batch, first=step == s.start_step + 1))  # 4-5: old log-probs, gap
            if step == s.start_step + 1:
                check_weights_arrived(s, stats)
            with timer("train"):
                stats.update(train_actor(s, batch))  # 6: mini-batch updates (TIS inside the loss)
            with timer("sync"):
                stats.update(sync_engines(s, version=step))  # 7
            if _due(step, cfg.run.eval_every, cfg.train.total_steps):
                stats.update(run_eval(s, step))  # 10
            with timer("heap_trim"):  # M.TIME_HEAP_TRIM
                release_free_heap()  # the step's freed pages back to the OS (see controller/heap.py)
            last = log_step(s, step, {**stats, **timer.metrics()})  # 8 (after eval, so eval joins the line)
            if _due(step, cfg.run.save_every, cfg.train.total_steps):
                save_step(s, step)  # 9: last, see train()'s docstring
    return last


def _due(step: int, every: int, total: int) -> bool:
    """Periodic work runs every ``every`` steps and at the final step (never when ``every`` is 0)."""
    return every > 0 and (step % every == 0 or step == total)


def collect_groups(s: TrainingSession, step: int) -> Tuple[Optional[List[Group]], Dict[str, float]]:
    """Rank 0: one step of groups and rollout metrics. The other ranks wait on the rendezvous store,
    not in a collective (a rollout may outlast parallel.collective_timeout_s); a failure on rank 0
    reaches them as ``Rank0Failed`` ("rollout failed on trainer rank 0: ...")."""

    def rollout() -> Tuple[List[Group], Dict[str, float]]:
        groups, stats = _generate_or_replay(s, step)
        stats.update(reward_metrics(groups))
        stats["time/reward_s"] = s.reward_fn.take_seconds()
        if s.cfg.run.dump_rollouts:
            os.makedirs(s.paths.rollouts_dir, exist_ok=True)
            dump_groups(groups, os.path.join(s.paths.rollouts_dir, ROLLOUT_FILE.format(step)))
        if _releases(s):
            for engine in s.engines:  # colocated engines give their memory to the trainer meanwhile
                s.run(engine.release_memory())
        return groups, stats

    out = rank0_then_all(world_store(), f"dapo/generate/{step}", s.rank0, rollout, what="rollout")
    groups, stats = out if out is not None else (None, {})
    if _offloads(s):  # every engine released its memory above, before any rank got past the wait
        start = time.perf_counter()
        s.actor.reload()
        stats["memory/trainer_reload_s"] = time.perf_counter() - start
    return groups, stats


def _generate_or_replay(s: TrainingSession, step: int) -> Tuple[List[Group], Dict[str, float]]:
    if s.cfg.run.replay_rollouts:  # the debug seam: a dumped step instead of the engines
        path = os.path.join(s.cfg.run.replay_rollouts, ROLLOUT_FILE.format(step))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run.replay_rollouts={s.cfg.run.replay_rollouts!r}: no {os.path.basename(path)} "
                                    "(a folder written by run.dump_rollouts=true, one file per step)")  # fmt: skip
        return load_groups(path), {"rollout/replayed": 1.0}
    if s.producer is not None:  # asynchronous DAPO: continue, offer and refill (rollout/producer.py)
        groups, stats = s.producer.batch(step)
    else:
        groups, stats = s.run(s.rollout.run(s.prompts))
    stats["rollout/stale_samples"] = float(sum(
        smp.weight_version != s.engines[0].weight_version for g in groups for smp in g.samples
    ))  # fmt: skip  # K = 0: on-policy, every sample comes from the weights of the previous step
    return groups, stats


def make_batch(s: TrainingSession, groups: Optional[List[Group]]) -> StepShard:
    """Rank 0 builds the step's batch and plans it once; each DP replica receives only its rows
    (``megatron/dispatch.py``). Returns this rank's shard."""
    batch = None
    if s.rank0:
        a = s.cfg.algo
        batch = build_train_batch(
            groups, pad_id=s.tokenizer.pad_token_id or 0, norm_adv_by_std=a.norm_adv_by_std,
            adv_eps=a.adv_eps, overlong_filter=a.overlong_filter,
        )  # fmt: skip
    return s.actor.dispatch(batch)


def old_logprobs(s: TrainingSession, shard: StepShard, *, first: bool = False) -> Dict[str, float]:
    """Recompute pi_old on each rank's own rows and measure its gap to the engine's log-probs; only
    those scalars are reduced over the ranks. TIS itself is applied inside the actor's loss when
    ``algo.tis.enable``.

    With ``algo.use_rollout_logprobs`` the engine's log-probs are pi_old and nothing is recomputed,
    except at the ``first`` step of a run or resume: that step still recomputes (and trains on the
    recomputation), because :func:`check_weights_arrived` needs the gap to tell whether the synced
    weights reached the engines. Later steps trust the engines that passed it."""
    if s.cfg.algo.use_rollout_logprobs and not first:
        return {}
    from megatron.core import parallel_state as ps

    s.actor.fill_old_logprobs(shard, temperature=s.cfg.rollout.temperature)
    return gap_stats(shard, cap=s.cfg.algo.tis.cap, last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
                     groups=(ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()))  # fmt: skip


def check_weights_arrived(s: TrainingSession, stats: Dict[str, float]) -> None:
    """The first step of a run (or of a resume): the engine sampled with the weights the trainer just
    pushed, so its log-probs of its own samples must match the trainer's recomputation up to numerics.
    A larger gap means the weights did not arrive (or arrived wrong): stop before training on them.
    The gap stats are reduced over every rank, so every rank decides the same."""
    if "rollout/logprob_gap_mean" not in stats or s.cfg.run.replay_rollouts:
        return  # the trainer reuses the rollout log-probs, or replays dumped steps: nothing to compare
    if s.cfg.rollout.max_staleness > 0 and s.start_step > 0:
        return  # a resumed async batch continues work of older weights: the gap is off-policy, not a bad sync
    gap, worst, bound = (
        stats["rollout/logprob_gap_mean"],
        stats["rollout/logprob_gap_max"],
        s.cfg.rollout.weight_check_max_gap,
    )
    if s.rank0:
        print(f"weight check (first step): mean |trainer - engine| log-prob gap {gap:.3g}, max {worst:.3g}, "
              f"bound {bound:g} (rollout.weight_check_max_gap)", flush=True)  # fmt: skip
    if not gap <= bound:
        raise RuntimeError(
            f"the engine's log-probs differ from the trainer's by {gap:.3g} on average (max {worst:.3g}) at the first "
            f"step, above rollout.weight_check_max_gap={bound:g}: the trainer's weights did not reach the "
            f"{s.cfg.rollout.engine} engines intact (check the weight-name mapping, dtype and the sync transport)"
        )


def train_actor(s: TrainingSession, batch: StepShard) -> Dict[str, float]:
    m = s.actor.train_step(batch, temperature=s.cfg.rollout.temperature)
    out = metrics_of("actor", m, keys=lambda k: not k.startswith(("tis/", "moe/")))
    # the off-policy IS and MoE router metrics keep their own sections
    out.update({k: v for k, v in m.items() if k.startswith(("tis/", "moe/"))})
    out["actor/tokens_per_s"] = out["actor/num_tokens"] / max(out["actor/time_total_s"], 1e-9)
    return out


def sync_engines(s: TrainingSession, *, version: int) -> Dict[str, float]:
    """Collective: resume colocated engine memory, push the actor's weights, stamp ``version``.
    Nothing to do when replaying dumped rollouts (no engines; every rank knows it from the config).

    Colocated with ``rollout.offload_trainer``, the devices change hands here. Order: every rank
    moves its Adam state and gradients to host memory, a barrier, rank 0 resumes the engines, the
    push (it reads the parameters, so they are still on the device), then the parameters follow.
    They all come back in :func:`collect_groups`, after the engines released their memory."""
    if s.cfg.run.replay_rollouts:
        return {}
    out: Dict[str, float] = {}
    if s.producer is not None:  # rank 0, K >= 1: interrupt the head start (partials keep their tokens)
        out.update(s.producer.pause())
    offload, freed = _offloads(s), 0
    if offload:
        freed = s.actor.offload(("optimizer", "grads"))
        if dist.is_initialized():
            dist.barrier()  # no engine may take a device back before its trainer rank has left it
    if s.rank0 and _releases(s):
        for engine in s.engines:
            s.run(engine.resume_memory())
    out |= push_weights(s.actor, s.engines if s.rank0 else [], version=version, run=s.run if s.rank0 else None,
                       link=s.stage_link)  # fmt: skip
    if offload:
        freed += s.actor.offload(("params",))
        out["memory/trainer_offloaded_gib"] = freed / 2**30  # this rank's (rank 0's on the metrics line)
    if s.rank0:
        out["sync/weight_version"] = float(min(e.weight_version for e in s.engines))
    return out


def _offloads(s: TrainingSession) -> bool:
    """Whether the trainer's state leaves the devices while colocated engines hold them (the same on
    every rank: config only)."""
    r = s.cfg.rollout
    return r.mode == "colocated" and r.offload_trainer and not s.cfg.run.replay_rollouts


def _releases(s: TrainingSession) -> bool:
    """Colocated engines release their memory while the trainer works, unless the asynchronous
    producer (K >= 1) keeps them generating meanwhile (``rollout.max_staleness``'s docstring)."""
    return s.cfg.rollout.mode == "colocated" and s.cfg.rollout.max_staleness == 0


def save_step(s: TrainingSession, step: int) -> None:
    """9: checkpoint ``step``. With the trainer offloaded, the colocated engines hand the devices back
    first (a barrier after rank 0 released them) and the trainer reloads; after the save the engines
    get them again through a full :func:`sync_engines` (a released engine has lost its weights),
    unless the run ends here."""
    if not _offloads(s):
        s.save(step)
        return
    if s.rank0:
        for engine in s.engines:
            s.run(engine.release_memory())
    if dist.is_initialized():
        dist.barrier()
    s.actor.reload()
    s.save(step)
    if step < s.cfg.train.total_steps:
        sync_engines(s, version=step)


def run_eval(s: TrainingSession, step: int) -> Dict[str, float]:
    """Rank 0: avg@k on ``data.eval_files`` with the engines' current weights (``{}`` without eval data).
    The other ranks wait for it on the rendezvous store (an eval may outlast the collective timeout)."""
    out = rank0_then_all(world_store(), f"dapo/eval/{step}", s.rank0, lambda: _eval_rank0(s), what="evaluation")
    return out or {}


def _eval_rank0(s: TrainingSession) -> Dict[str, float]:
    if s.eval_data is None:  # None also when replaying (no engines)
        return {}
    r = s.cfg.rollout
    data, ids = s.eval_data
    return evaluate(s.engines, data, ids, reward_fn=s.reward_fn, decode=s.decode, params=eval_sampling(s.cfg.eval),
                    seed=r.seed, concurrency=s.cfg.eval.max_concurrency or None,  # 0: the whole set at once
                    timeout_s=r.request_timeout_s, run=s.run)  # fmt: skip


def log_step(s: TrainingSession, step: int, stats: Dict[str, float]) -> Dict[str, float]:
    """Rank 0: write one metrics line (console, jsonl, wandb) with GPU stats when there is a GPU."""
    if not s.rank0:
        return {}
    from dapo_megatron.observability.gpu import gpu_metrics

    stats = {**stats, **gpu_metrics()}
    if torch.cuda.is_available():
        stats["gpu/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    s.logger.log(step, stats)
    return stats

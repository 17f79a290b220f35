"""Everything a training run holds, built from one :class:`~dapo_megatron.config.Config`.

Every trainer rank builds the process groups, the Megatron actor and the run paths. Trainer rank 0
also owns the driver side: tokenizer, prompt data, reward, the rollout engines on a private event
loop, the streaming rollout, evaluation data and the metrics logger. Other ranks wait for rank 0's
rollout on the rendezvous store, then receive their DP replica's rows of each step
(``controller/loop.py``, ``megatron/dispatch.py``).

Resume (``run.resume`` and a checkpoint in ``<run.dir>/checkpoints``) restores the actor (weights,
optimizer, scheduler, RNG) and, through ``extra_state``, the data sampler and the dynamic-sampling
state (next group id, carried groups), so a resumed run draws the same prompts with the same seeds.
With ``rollout.max_staleness >= 1`` that state also holds the asynchronous producer's work: groups in
progress with their tokens, log-probs and per-token versions (``rollout/producer.py``), so a resumed
run continues those trajectories instead of re-issuing their prompts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from dapo_megatron.config import Config
from dapo_megatron.controller.engines import build_engines, read_hf_config, sglang_device
from dapo_megatron.controller.prompts import SampledPrompts, load_prompts
from dapo_megatron.controller.run_dir import RunLock, RunPaths, lock_run_dir, prepare_run_dir
from dapo_megatron.rollout.base import SamplingParams

STEP_DIR = "step_{:06d}"


class PeerStartError(RuntimeError):
    """Raised on trainer ranks other than 0 when rank 0 failed to open the run (its error inside)."""


def _rank0_then_all(rank0: bool, open_rank0: Callable[[], None]) -> None:
    """Run ``open_rank0`` on rank 0, then let every rank learn whether it worked.

    Without this, a rank 0 that refuses a bad input (a locked folder, a malformed dataset, a
    tokenizer too large) exits while the other ranks sit in their next collective until the
    process-group timeout. Rank 0 re-raises its own error (so the CLI prints it as one line);
    the others raise :class:`PeerStartError` quoting it. They wait on the rendezvous store, not in a
    collective: starting the engines (loading a large checkpoint) may outlast the collective timeout.
    """
    from dapo_megatron.parallel.rank0_wait import Rank0Failed, rank0_then_all, world_store

    try:
        rank0_then_all(world_store(), "dapo/open", rank0, open_rank0, what="opening the run")
    except Rank0Failed as e:
        detail = str(e).split("failed on trainer rank 0: ", 1)[-1]
        raise PeerStartError(f"trainer rank 0 could not open the run, so this rank stops too: {detail}") from None


def start_trainer(cfg: Config) -> tuple:
    """Process groups and the actor on this rank: returns ``(env, topology, spec, actor)``."""
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    spec = model_spec_from_hf(read_hf_config(cfg.model.hf_path))
    p = cfg.parallel
    env = init_distributed(timeout_s=p.collective_timeout_s)
    if p.world_size and p.world_size != env.world_size:
        raise ValueError(f"parallel.world_size={p.world_size} but the launcher started {env.world_size} ranks")
    topology = Topology.from_config(p, env.world_size)
    init_model_parallel(topology, seed=cfg.model.seed, timeout_s=p.collective_timeout_s)
    actor = MegatronActor(
        spec, topology, model_cfg=cfg.model, optim_cfg=cfg.optim, train_cfg=cfg.train, algo_cfg=cfg.algo,
        max_response_len=cfg.rollout.max_response_len, total_steps=cfg.train.total_steps,
        prompts_per_step=cfg.rollout.prompts_per_step, group_size=cfg.rollout.n_samples_per_prompt,
        use_distributed_optimizer=p.use_distributed_optimizer, sequence_parallel=p.sequence_parallel,
    )  # fmt: skip
    return env, topology, spec, actor


class TrainingSession:
    """The run's live objects; use as a context manager so engines and process groups are released.

    Attributes (``None`` on ranks other than 0 where marked):
        cfg, paths, rank0, actor, start_step (the last completed step: 0 for a fresh run);
        tokenizer*, rollout* (``StreamingRollout``), engines*, logger*, eval_data* (or None).

    Rank 0 holds the run folder's single-writer lock (``run_lock``, or one it takes itself and
    releases in :meth:`close`) from before the folder is touched until the session is closed.
    """

    def __init__(self, cfg: Config, *, console: bool = True, run_lock: Optional[RunLock] = None):
        check_async(cfg)
        self.cfg = cfg
        self.producer: Any = None  # rank 0 with rollout.max_staleness >= 1: the AsyncProducer
        self.env, self.topology, self.spec, self.actor = start_trainer(cfg)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.engines: List[Any] = []
        self.stage_link: Any = None  # this rank's line to the SGLang servers (per-stage weight sync)
        self.logger: Any = None
        self._lock, self._own_lock = run_lock, run_lock is None
        try:
            self._open(cfg, console)
        except BaseException:
            self.close()  # engine servers this rank started must not outlive a failed start
            raise

    def _open(self, cfg: Config, console: bool) -> None:
        self.rank0 = self.env.rank == 0
        self.eval_data: Optional[tuple] = None
        self.rollout: Any = None
        _rank0_then_all(self.rank0, lambda: self._open_driver(cfg))
        if cfg.rollout.engine == "sglang" and not cfg.run.replay_rollouts:
            from dapo_megatron.controller.stage_link import connect_stage_link

            backend = "nccl" if sglang_device(cfg) == "cuda" else "gloo"  # rank 0's choice is the one used
            self.stage_link = connect_stage_link(self.engines, backend=backend)
        self.paths = RunPaths.under(cfg.run.dir)
        self.start_step = self._restore()
        if self.rank0:
            # metrics.jsonl must agree with the restored step: lines after it are redone now. With no
            # checkpoint (start_step 0) nothing is kept, since step 0's eval line is logged again.
            _truncate_metrics(self.paths.metrics_path, self.start_step if self.start_step > 0 else -1)
            # after truncating: the logger appends to metrics.jsonl
            from dapo_megatron.observability.sinks import MetricsLogger, wandb_settings

            wandb_cfg = wandb_settings(cfg.run) if cfg.run.wandb else None
            self.logger = MetricsLogger(self.paths.root, console=console, wandb_cfg=wandb_cfg)

    # ------------------------------------------------------------------ rank-0 driver side
    def _open_driver(self, cfg: Config) -> None:
        """Rank 0: lock and prepare the run folder, then build the driver side."""
        # the lock first: a second run must neither read nor write this folder
        self._lock = self._lock or lock_run_dir(cfg.run.dir)
        self.paths = prepare_run_dir(cfg.run.dir, resume=cfg.run.resume, config=cfg)
        self._build_driver()

    def _build_driver(self) -> None:
        from transformers import AutoTokenizer

        from dapo_megatron.data.sampler import ResumableSampler
        from dapo_megatron.errors import InputError
        from dapo_megatron.rewards import get_reward_fn
        from dapo_megatron.rollout.generator import StreamingRollout
        from dapo_megatron.weights.tokenizer_fit import tokenizer_problem

        cfg, r, a = self.cfg, self.cfg.rollout, self.cfg.algo
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
        # Ids past the model's vocabulary could never be sampled: refuse before any data or engine.
        source = f"model.hf_path={cfg.model.hf_path}"
        problem = tokenizer_problem(len(self.tokenizer), self.spec.vocab_size, source=source)
        if problem:
            raise InputError(problem)
        if not cfg.data.train_files:
            raise ValueError("data.train_files is empty: give parquet/jsonl prompt files (DAPO-Math schema)")
        data, ids = load_prompts(cfg.data.train_files, self.tokenizer, cfg, dedup=cfg.data.dedup,
                                 skip_malformed=cfg.data.skip_malformed)  # fmt: skip
        self.sampler = ResumableSampler(len(data), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.prompts = SampledPrompts(data, ids, self.sampler)
        self.reward_fn = TimedReward(get_reward_fn(cfg.reward.name, cfg.reward.timeout_s))
        self.loop = asyncio.new_event_loop()
        if cfg.run.replay_rollouts:  # training on dumped steps: no engines, no rollout
            if not os.path.isdir(cfg.run.replay_rollouts):
                raise FileNotFoundError(f"run.replay_rollouts={cfg.run.replay_rollouts!r}: expected the rollouts/ "
                                        "folder of a run trained with run.dump_rollouts=true")  # fmt: skip
            return
        self.engines = build_engines(cfg, self.paths.root)
        sampling = SamplingParams(n=r.n_samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=r.max_response_len, seed=r.seed,
                                  return_routed_experts=a.routing_replay == "rollout")  # fmt: skip
        self.rollout = StreamingRollout(
            self.engines, self.reward_fn, tokenizer_decode=self.decode, sampling=sampling,
            max_response_len=r.max_response_len, target_groups=r.prompts_per_step,
            gen_prompts_per_round=r.gen_prompts_per_round, overlong_enable=a.overlong_buffer.enable,
            overlong_len=a.overlong_buffer.len, overlong_penalty_factor=a.overlong_buffer.penalty_factor,
            filter_metric=a.filter_groups.metric, filter_enable=a.filter_groups.enable,
            max_num_gen_batches=a.filter_groups.max_num_gen_batches, on_exhausted=a.filter_groups.on_exhausted,
            max_concurrency=r.max_concurrency, request_timeout_s=r.request_timeout_s, max_retries=r.max_retries,
            keep_surplus=r.keep_surplus, keep_partial=r.max_staleness > 0, offer_order=r.offer_order,
        )  # fmt: skip
        if r.max_staleness > 0:
            from dapo_megatron.rollout.producer import AsyncProducer

            self.producer = AsyncProducer(
                self.rollout, self.prompts, self.loop, max_staleness=r.max_staleness,
                interleave=r.async_interleave, max_response_len=r.max_response_len,
            )  # fmt: skip
        if cfg.data.eval_files:
            self.eval_data = load_prompts(cfg.data.eval_files, self.tokenizer, cfg)

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, coro: Any) -> Any:
        """Run an engine coroutine on the driver's event loop (rank 0)."""
        assert self.loop is not None, "engine calls happen on trainer rank 0 only"
        return self.loop.run_until_complete(coro)

    # ------------------------------------------------------------------ checkpoints
    def _restore(self) -> int:
        from dapo_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint

        # A broken newest checkpoint (missing or truncated file) is skipped for the newest intact one.
        # Every rank checks the same shared folder, so all choose alike; rank 0 says what it skipped.
        report = _report_skipped if self.rank0 else None
        found = latest_checkpoint(self.paths.checkpoints_dir, report=report) if self.cfg.run.resume else None
        if found is None:
            if self.cfg.model.load:
                load_checkpoint(self.actor, self.cfg.model.load, model_only=True)
            return 0
        step, extra = load_checkpoint(self.actor, found)
        if self.rank0:
            self.sampler.load_state_dict(extra["sampler"])
            if self.rollout is not None:
                self.rollout.load_state_dict(extra["rollout"])
        return step

    def save(self, step: int) -> str:
        """Collective: checkpoint ``step`` (actor + sampler + dynamic-sampling state), prune old ones.

        Invariant: a checkpoint never holds inf/nan weights. The actor already stops at the update that
        made them; this second check also covers weights that arrived non-finite (e.g. from model.load)."""
        from dapo_megatron.megatron.checkpoint import save_checkpoint

        self.actor.check_weights_finite(f"refusing to write the checkpoint of step {step}")
        extra = {}
        if self.rank0:
            extra = {"sampler": self.sampler.state_dict(), "rollout": self.rollout.state_dict() if self.rollout else {}}
        path = os.path.join(self.paths.checkpoints_dir, STEP_DIR.format(step))
        save_checkpoint(self.actor, path, step=step, extra_state=extra)
        if self.rank0:
            _prune_checkpoints(self.paths.checkpoints_dir, keep=self.cfg.run.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ teardown
    def __enter__(self) -> TrainingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        from dapo_megatron.parallel.init import shutdown

        if self.stage_link is not None:
            self.stage_link.close()
            self.stage_link = None
        if self.producer is not None:
            self.producer.close()  # its thread drives the event loop: stop it before the loop closes
            self.producer = None
        if self.loop is not None:
            for engine in self.engines:
                self.run(engine.shutdown())
            self.loop.close()
            self.loop = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        shutdown()
        if self._lock is not None and self._own_lock:  # last: nothing of this run writes after it
            self._lock.release()


def check_async(cfg: Config) -> None:
    """Refuse asynchronous DAPO (``rollout.max_staleness >= 1``) where it cannot be what it claims,
    naming the keys (every rank checks the same config, so every rank refuses alike)."""
    r, a = cfg.rollout, cfg.algo
    if r.max_staleness == 0:
        return
    k = f"rollout.max_staleness={r.max_staleness}"
    if a.use_rollout_logprobs:
        raise ValueError(f"{k} needs algo.use_rollout_logprobs=false: the stale rollout log-probs are the "
                         "behaviour policy, the trainer's recomputed old log-probs the proximal one")  # fmt: skip
    if not a.tis.enable:
        raise ValueError(f"{k} needs algo.tis.enable=true: samples from older weights must be importance-weighted "
                         "by pi_old / pi_rollout (truncated at algo.tis.cap)")  # fmt: skip
    if r.mode == "colocated" and r.offload_trainer:
        raise ValueError(f"{k} with rollout.mode=colocated and rollout.offload_trainer=true: the engines would "
                         "generate while the trainer holds the devices; use rollout.mode=disaggregated, or "
                         "rollout.offload_trainer=false where engine and trainer fit in memory together")  # fmt: skip
    if cfg.run.replay_rollouts:
        raise ValueError(f"{k} with run.replay_rollouts: replayed steps have no engines to produce ahead; "
                         "set rollout.max_staleness=0")  # fmt: skip


class TimedReward:
    """A reward function that adds up the seconds spent in it (scoring runs in worker threads,
    overlapping generation, so this is CPU time of the reward, not a slice of the step's wall time)."""

    def __init__(self, fn: Callable):
        self.fn, self._seconds, self._lock = fn, 0.0, threading.Lock()

    def __call__(self, text: str, ground_truth: str) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(text, ground_truth)
        finally:
            with self._lock:
                self._seconds += time.perf_counter() - start

    def take_seconds(self) -> float:
        """Seconds since the last call, and reset."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return seconds


def _report_skipped(message: str) -> None:
    """How a resume says which checkpoint it skipped and why (stderr: it is a warning)."""
    import sys

    print(f"resume: {message}", file=sys.stderr, flush=True)


def _prune_checkpoints(checkpoints_dir: str, *, keep: int) -> None:
    """Delete all but the newest ``keep`` ``step_*`` folders (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    steps = sorted(d for d in os.listdir(checkpoints_dir) if d.startswith("step_") and "." not in d)
    for name in steps[:-keep]:
        shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines of steps after ``step`` (logged before a crash, redone after resume); atomic.
    ``step=-1`` drops every line."""
    import json

    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:  # a line torn by the crash: drop it
            continue
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def metrics_of(prefix: str, stats: Dict[str, float], keys: Optional[Callable[[str], bool]] = None) -> Dict[str, float]:
    """``stats`` with ``prefix/`` in front of every key (optionally only the keys ``keys`` accepts)."""
    return {f"{prefix}/{k}": float(v) for k, v in stats.items() if keys is None or keys(k)}

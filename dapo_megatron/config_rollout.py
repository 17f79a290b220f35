"""Config section of generation: engines, sampling and batch sizes."""

from __future__ import annotations

from dataclasses import dataclass

from dapo_megatron.config_base import _check, _choice


@dataclass(frozen=True)
class RolloutConfig:
    """Generation: engines, sampling and batch sizes.

    Fields:
        engine: ``embedded`` (transformers, the CPU default), ``sglang`` or ``vllm``.
        mode: ``colocated`` (engines time-share the trainer devices) or ``disaggregated``.
        num_engines: engine instances (servers) in disaggregated mode.
        engine_tensor_parallel: TP degree inside each engine.
        prompts_per_step: valid prompt groups per training step (DAPO: 512).
        n_samples_per_prompt: responses per prompt, the group size G (DAPO: 16).
        gen_prompts_per_round: prompts of a step's first generation round (DAPO: 3 x prompts_per_step);
            refill rounds are sized from the observed keep rate, at most this many.
        max_prompt_len: prompts longer than this (in tokens) are rejected.
        max_response_len: L_max, the generation cap in tokens.
        temperature / top_p / top_k: sampling; ``top_k=-1`` disables top-k.
        max_concurrency: in-flight prompt groups per server worker (an engine fronting several
            workers, like SGLang behind its router, takes this times its live workers).
        request_timeout_s: a request taking longer fails and is retried on another engine.
        max_retries: retries of a failed request before the step fails.
        keep_surplus: keep completed surplus groups for the next step instead of discarding them.
        offer_order: how finished groups reach dynamic sampling. ``submission`` (default): in the
            order they were submitted, a group waiting for every earlier one; a step's batch does not
            depend on the engines' timing (reproducible runs and resumes) and is not biased towards
            short responses. ``completion``: as they finish; the batch fills sooner when response
            lengths have a long tail, at the price of both.
        seed: base seed of sampling.
        router_port / engine_base_port: ports of sglang-router and the first engine server.
        mem_fraction_static: SGLang's static memory fraction per engine.
        sglang_python: the Python interpreter with SGLang installed, for the servers this run starts
            (local fleet and ``dapo-megatron engines``); "" means this interpreter. CPU machines build
            one with ``tools/sglang_env.sh`` (``.venv-sglang/bin/python``).
        sglang_device: ``auto`` (CUDA when visible, else CPU), ``cuda`` or ``cpu``.
        sglang_max_total_tokens: KV-pool size in tokens per server; 0 lets SGLang size it on a GPU
            (on CPU, 0 means 16384).
        server_start_timeout_s: how long the servers may take to load before the run fails.
        weight_check_max_gap: the first step's check that the trainer's weights reached the engines:
            the mean |trainer log-prob - engine log-prob| of the first batch must not exceed this.
        offload_trainer: colocated mode only: while the engines hold the devices (from the weight
            sync to the end of generation), the trainer's parameters, Adam state and gradients wait
            in host memory (pinned on CUDA) and ``empty_cache`` returns their memory; they come back
            before the old-log-prob pass. Costs host RAM (about params + optimizer state per rank)
            and two PCIe copies per step. Off by default (an opt-in trade of host RAM and copies for
            device memory); tested on with the embedded engine and with SGLang servers behind the
            router (an SGLang engine pauses before each release: its scheduler exits on a release
            that meets a running request).
        max_staleness: K, asynchronous DAPO (``rollout/producer.py``). 0 is the synchronous loop
            (generate, train, sync). K >= 1: while the actor trains step t, a producer keeps
            generating the groups of step t + 1 with the weights of step t - 1; at the weight sync
            in-flight generations are aborted keeping their tokens (partial rollouts) and continue
            with the new weights. A sample is used at step t only if its oldest token came from
            weights at most K versions behind the policy being trained (version t - 1); older groups
            are dropped and older partial trajectories re-generated, both counted
            (``async/stale_*``). Needs the off-policy correction: ``algo.tis.enable=true`` and
            ``algo.use_rollout_logprobs=false`` (the engine's log-probs are the behaviour policy, the
            recomputed old log-probs the proximal one). Placement: colocated engines on one device
            cannot generate while the actor trains, so ``rollout.offload_trainer=true`` is refused;
            colocated without offload keeps the engines' memory during training (only where memory
            allows); disaggregated engines are the real target.
        async_interleave: how the K >= 1 producer interleaves with training. ``overlap``: it runs
            in a background thread while the actor trains and is interrupted by the weight sync
            (timing decides where). ``fixed``: it runs in the foreground right after a batch is
            taken, and each head-start request stops at a fixed point (half of
            ``max_response_len`` tokens), so runs are reproducible (tests, lossless-resume checks).
        embedded_process: ``engine=embedded`` only: each embedded engine runs in a worker process of
            its own (:mod:`dapo_megatron.rollout.embedded_worker`) instead of the trainer's, so its
            decoding does not compete with the trainer for the GIL; weights reach it through shared
            memory. Off by default for now.
        embedded_batch_rows: ``engine=embedded`` only: the rows (KV-cache slots) of the engine's
            decode batch. Every decode step runs all of them, busy or not (that fixed shape makes a
            request's samples bitwise independent of what else is in flight), so it should match the
            rows actually in flight. 0 (default): ``min(max_concurrency, gen_prompts_per_round) *
            n_samples_per_prompt``, a whole round in one wave.
    """

    engine: str = "embedded"
    mode: str = "colocated"
    num_engines: int = 1
    engine_tensor_parallel: int = 1
    prompts_per_step: int = 512
    n_samples_per_prompt: int = 16
    gen_prompts_per_round: int = 1536
    max_prompt_len: int = 2048
    max_response_len: int = 20480
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_concurrency: int = 64
    request_timeout_s: float = 3600.0
    max_retries: int = 3
    keep_surplus: bool = False
    seed: int = 0
    router_port: int = 30000
    engine_base_port: int = 30010
    mem_fraction_static: float = 0.7
    sglang_python: str = ""
    sglang_device: str = "auto"
    sglang_max_total_tokens: int = 0
    server_start_timeout_s: float = 900.0
    weight_check_max_gap: float = 0.05
    offload_trainer: bool = False
    offer_order: str = "submission"
    max_staleness: int = 0
    async_interleave: str = "overlap"
    embedded_process: bool = False
    embedded_batch_rows: int = 0

    def __post_init__(self) -> None:
        _choice(self.engine, "rollout.engine", ("embedded", "sglang", "vllm"))
        _choice(self.sglang_device, "rollout.sglang_device", ("auto", "cuda", "cpu"))
        _check(self.sglang_max_total_tokens >= 0, "rollout.sglang_max_total_tokens", "must be >= 0 (0: automatic)")
        _check(self.server_start_timeout_s > 0, "rollout.server_start_timeout_s", "must be > 0")
        _check(self.weight_check_max_gap > 0, "rollout.weight_check_max_gap", "must be > 0")
        _check(not self.embedded_process or self.engine == "embedded", "rollout.embedded_process",
               f"is for rollout.engine=embedded only, got engine={self.engine!r}")  # fmt: skip
        _choice(self.mode, "rollout.mode", ("colocated", "disaggregated"))
        for name in (
            "num_engines",
            "engine_tensor_parallel",
            "prompts_per_step",
            "n_samples_per_prompt",
            "max_prompt_len",
            "max_response_len",
            "max_concurrency",
        ):
            _check(getattr(self, name) >= 1, f"rollout.{name}", "must be >= 1")
        _check(self.gen_prompts_per_round >= 1, "rollout.gen_prompts_per_round", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0 (greedy decoding is not a policy)")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1")
        _check(self.request_timeout_s > 0, "rollout.request_timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "rollout.max_retries", "must be >= 0")
        _check(0 < self.mem_fraction_static < 1, "rollout.mem_fraction_static", "must be in (0, 1)")
        _check(self.max_staleness >= 0, "rollout.max_staleness", "must be >= 0 (0: synchronous)")
        _choice(self.async_interleave, "rollout.async_interleave", ("overlap", "fixed"))
        _choice(self.offer_order, "rollout.offer_order", ("submission", "completion"))
        _check(self.embedded_batch_rows >= 0, "rollout.embedded_batch_rows", "must be >= 0 (0: automatic)")

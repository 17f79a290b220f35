"""The embedded rollout engine: a transformers causal LM in this process (the CPU default).

Sampling matches what the trainer assumes (see :mod:`dapo_megatron.rollout.base`): at each step
``logp = log_softmax(logits / T)`` over the full vocabulary; top-k then top-p restrict the candidates
(the kept probabilities are renormalised **for drawing only**), a token is drawn with uniforms from the
request's own seeded ``torch.Generator``, and the reported logprob is ``logp[token]`` of the
untruncated distribution (``embedded_sampling``).

Continuous batching (``embedded_sched``): one decode thread runs every request in flight together,
one forward pass per step over a preallocated KV cache of ``max_batch_rows`` slots by ``max_seq_len``
positions (``embedded_cache``), computing only the smallest of a few decode shapes that holds every
running row (rows move down into freed slots); new requests are prefilled together and join at the next step, finished
rows leave at once, an abort ends a request at the next step boundary with the tokens it has
(``finish_reason="abort"``).
The decode shapes are the ones a start-up probe found to give every row the same bits, so a
request's completions are bitwise the same whatever else is in flight: a run is reproducible at any
concurrency.

Weights: :meth:`EmbeddedEngine.update_weights_sync` stops admitting, waits until no request is active
(the running ones finish, or the caller aborts them), loads, stamps the version and resumes; so every
completion was produced by exactly one set of weights and carries that ``weight_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Dict, List, Optional, Sequence, Set

import torch
from torch import Tensor

from dapo_megatron.rollout.base import (
    Completion,
    EngineDeadError,
    EngineError,
    NamedTensors,
    RequestTimeout,
    SamplingParams,
)
from dapo_megatron.rollout.embedded_routing import check_routing_support, row_routes
from dapo_megatron.rollout.embedded_sampling import sample_next
from dapo_megatron.rollout.embedded_sched import Request, Scheduler
from dapo_megatron.rollout.embedded_weights import target_of

__all__ = ["EmbeddedEngine", "sample_next"]

_GATE_POLL_S = 0.02  # how often a request parked by pause() re-checks for an abort
_MAX_WIDTH = 4096  # default cache width cap: a long-context config must not allocate its full context
_STEP_PARAM_BUDGET = 2**27  # default slots: slots x parameters per step at most this (about 0.27 GFLOP)
_MAX_SLOTS = 256


def _as_config(hf_config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(hf_config, PretrainedConfig):
        return hf_config
    if isinstance(hf_config, dict):
        cfg = dict(hf_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoConfig.from_pretrained(str(hf_config))


def _eos_ids(config) -> Set[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _default_slots(model: Any) -> int:
    """Slots when none is given: up to 256, fewer for a bigger model (a full batch's step costs every
    slot's forward), at least 8."""
    params = sum(p.numel() for p in model.parameters())
    return max(8, min(_MAX_SLOTS, _STEP_PARAM_BUDGET // max(1, params)))


class EmbeddedEngine:
    """In-process :class:`~dapo_megatron.rollout.base.RolloutEngine` on a transformers model.

    Args:
        hf_config: a ``PretrainedConfig``, a dict with ``model_type``, or a path to an HF dir/config.
        dtype: parameter dtype (float32 on CPU keeps logprobs comparable to the trainer's).
        seed: initialises the random weights (before any update) and the default sampling seeds.
        device: torch device for the model.
        state_dict: optional HF-named initial weights (otherwise random init from ``seed``).
        max_batch_rows: KV-cache slots, the rows decoded together (a step computes the smallest decode
            shape that holds the running rows);
            None: 256, fewer for models over ~0.5 M parameters. A request needs ``n`` free slots.
        max_seq_len: positions per slot (prompt + response); None: ``max_position_embeddings`` capped
            at 4096. A longer prompt is refused; a response reaching it ends with ``"length"``.
    """

    def __init__(
        self,
        hf_config: Any,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: str = "cpu",
        state_dict: Optional[Dict[str, Tensor]] = None,
        max_batch_rows: Optional[int] = None,
        max_seq_len: Optional[int] = None,
    ):
        from transformers import AutoModelForCausalLM

        self.config = _as_config(hf_config)
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            raise ValueError("EmbeddedEngine: sliding-window attention layers are not supported (full attention only)")
        self.device, self.dtype, self.seed = device, dtype, int(seed)
        # fork_rng: building the model must not move the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.to(device).eval()
        self.eos_token_ids = _eos_ids(self.config)
        self.pad_id = int(getattr(self.config, "pad_token_id", None) or 0)
        self._targets = self.model.state_dict(keep_vars=True)  # HF name -> live Parameter/buffer
        slots = _default_slots(self.model) if max_batch_rows is None else int(max_batch_rows)
        width = int(max_seq_len or min(int(getattr(self.config, "max_position_embeddings", _MAX_WIDTH)), _MAX_WIDTH))
        if slots < 1 or width < 2:
            raise ValueError(f"EmbeddedEngine: max_batch_rows must be >= 1 and max_seq_len >= 2, got {slots}, {width}")
        self._sched = Scheduler(self, slots, width)
        self._gate = threading.Event()
        self._gate.set()
        self._abort_epoch = 0
        self._requests = 0
        self._version = 0
        self._alive = True
        if state_dict is not None:
            self.update_weights_sync(list(state_dict.items()), 0)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
                        **kwargs: Any):  # fmt: skip
        """Config and weights from an HF directory (``config.json`` + safetensors); ``kwargs``:
        ``max_batch_rows``, ``max_seq_len``."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model.config, dtype=dtype, seed=seed, device=device, state_dict=model.state_dict(), **kwargs)

    # ------------------------------------------------------------------ sync core
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def abort_epoch(self) -> int:
        """Bumped by every :meth:`abort_all_sync`; pass the value read at request arrival as ``epoch``."""
        return self._abort_epoch

    @property
    def busy(self) -> bool:
        """A request is queued or decoding, or a weight load is waiting or running."""
        return self._sched.busy

    @property
    def max_batch_rows(self) -> int:
        return self._sched.slots

    @property
    def max_seq_len(self) -> int:
        return self._sched.width

    @property
    def forward_steps(self) -> int:
        """Decode steps (batched forward passes over every slot) run so far."""
        return self._sched.forwards

    @property
    def decode_fill(self) -> float:
        """Running rows over rows computed, over every decode step so far (1.0: no idle slot was
        computed; 0.0 before the first step)."""
        return self._sched.rows_busy / self._sched.rows_decoded if self._sched.rows_decoded else 0.0

    @property
    def prefill_passes(self) -> int:
        """Prefill forwards (each up to ``embedded_cache.PREFILL_ROWS`` prompts) run so far."""
        return self._sched.prefills

    def _default_seed(self) -> int:
        self._requests += 1
        return (self.seed * 1_000_003 + self._requests) % (2**63)

    def _requests_for(self, prompts: Sequence[List[int]], params: SamplingParams, aborted) -> List[Request]:
        """One scheduler request per prompt; prompt ``i`` seeds its generator with ``seed + i``-derived
        values (prompt 0 with the seed itself, so ``generate`` equals ``generate_sync`` of one prompt)."""
        if not self._alive:
            raise EngineDeadError("embedded engine is shut down")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        width, slots = self._sched.width, self._sched.slots
        if params.n > slots:
            raise ValueError(f"generate: n={params.n} samples need {params.n} rows; max_batch_rows is {slots}")
        too_long = [len(p) for p in prompts if len(p) > width]
        if too_long:
            raise ValueError(f"generate: a prompt of {too_long[0]} tokens exceeds max_seq_len={width}")
        if params.return_routed_experts:
            check_routing_support(self.config)
        seed = self._default_seed() if params.seed is None else params.seed
        stop = frozenset(self.eos_token_ids | set(params.stop_token_ids))
        out = []
        for i, p in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed((seed + i * 0x9E3779B1) % (2**63))
            limit = min(params.max_new_tokens, width - len(p) + 1)
            out.append(Request(list(p), params, gen, aborted, limit, stop))
        return out

    def _aborted(self, epoch: int, cancel: Optional[threading.Event]):
        return lambda: self._abort_epoch != epoch or (cancel is not None and cancel.is_set())

    @staticmethod
    def _completions(req: Request) -> List[Completion]:
        if req.error is not None:
            raise EngineError(f"embedded decode failed: {type(req.error).__name__}: {req.error}") from req.error
        out = [Completion(t, lp, r or "abort", weight_version=req.version)
               for t, lp, r in zip(req.tokens, req.logps, req.reasons)]  # fmt: skip
        if req.params.return_routed_experts:
            for c, steps in zip(out, req.routes):
                ids = row_routes(req.prompt_routes, steps)
                if ids is not None:  # None: aborted before its prefill (no token either)
                    c.meta["routed_experts"] = ids
        return out

    def generate_sync(
        self,
        prompts: Sequence[List[int]],
        params: SamplingParams,
        *,
        cancel: Optional[threading.Event] = None,
        epoch: Optional[int] = None,
    ) -> List[List[Completion]]:
        """``params.n`` completions for each prompt (``result[p][j]``), batched with everything else in
        flight. ``cancel`` (this request) or :meth:`abort_all_sync` after ``epoch`` was read cut the
        request short: its unfinished rows come back with ``finish_reason="abort"`` and their tokens.
        """
        epoch = self._abort_epoch if epoch is None else epoch
        aborted = self._aborted(epoch, cancel)
        reqs = self._requests_for(prompts, params, aborted)
        # A paused engine parks new requests here; they still honour an abort while parked.
        while not self._gate.wait(_GATE_POLL_S):
            if aborted():
                break
        self._sched.submit(reqs)
        for req in reqs:
            req.done.wait()
        return [self._completions(req) for req in reqs]

    def abort_all_sync(self) -> None:
        """Abort every request started (or parked) before this call; later requests are unaffected."""
        self._abort_epoch += 1
        self._sched.kick()

    def update_weights_sync(self, named_tensors: NamedTensors, version: int) -> None:
        """Copy HF-named tensors into the live parameters, then stamp ``version``.

        Names must be the model's own ``state_dict`` names, or a MoE checkpoint's per-expert names
        (loaded into the fused expert parameters, ``embedded_weights``); an unknown name or a shape mismatch
        raises before anything is copied (a mapping bug must not half-load a model). With tied
        embeddings ``lm_head.weight`` and ``model.embed_tokens.weight`` are one tensor, so either
        name loads both (if both are sent, the later one wins).

        Ordering: admission stops first, then this waits until no request is active (running ones
        finish; a caller that wants them cut calls :meth:`abort_all_sync` first), loads, stamps
        ``version``, and lets queued requests in: no completion mixes two weight versions.
        """
        items = list(named_tensors)
        targets = []
        for name, t in items:
            target = target_of(self._targets, name)
            targets.append(target)
            if target is None:
                raise KeyError(f"update_weights: unknown parameter {name!r} for {type(self.model).__name__}")
            if tuple(target.shape) != tuple(t.shape):
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(t.shape)}, model expects {tuple(target.shape)}"
                )
        sched = self._sched
        with sched.cv:
            sched.loading += 1
            try:
                while sched.active:
                    sched.cv.wait()
                with sched.model_lock, torch.no_grad():
                    for (_, t), target in zip(items, targets):
                        target.copy_(t.detach().to(device=target.device, dtype=target.dtype))
                    self._version = int(version)
            finally:
                sched.loading -= 1
                sched.cv.notify_all()

    def state_dict(self) -> Dict[str, Tensor]:
        """Detached copies of the current weights, HF names."""
        with self._sched.model_lock:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ RolloutEngine (async)
    async def generate(
        self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: Optional[float] = None
    ) -> List[Completion]:
        """Submitted straight from the event loop (no worker thread per request, so any number of
        requests batch together); the result arrives through ``call_soon_threadsafe``."""
        cancel = threading.Event()
        aborted = self._aborted(self._abort_epoch, cancel)  # an abort_all issued from now on applies
        try:
            return await asyncio.wait_for(self._generate_one(prompt_ids, params, aborted), timeout_s)
        except asyncio.TimeoutError:
            cancel.set()  # the decode thread drops the request at its next step
            self._sched.kick()
            raise RequestTimeout(f"embedded generate exceeded {timeout_s} s") from None
        except asyncio.CancelledError:
            cancel.set()
            self._sched.kick()
            raise

    async def _generate_one(self, prompt_ids: List[int], params: SamplingParams, aborted) -> List[Completion]:
        [req] = self._requests_for([prompt_ids], params, aborted)
        while not self._gate.is_set() and not aborted():
            await asyncio.sleep(_GATE_POLL_S)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def wake() -> None:
            # RuntimeError: the loop closed, the caller gave up (timed out) and nobody waits
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve)

        req.callbacks.append(wake)
        self._sched.submit([req])
        await done
        return self._completions(req)

    async def abort_all(self) -> None:
        self.abort_all_sync()

    async def pause(self) -> None:
        """New requests wait until :meth:`resume`; requests already submitted finish normally."""
        self._gate.clear()

    async def resume(self) -> None:
        self._gate.set()

    async def release_memory(self) -> None:
        """No-op on CPU (kept for the protocol; colocated GPU engines free their KV cache here)."""

    async def resume_memory(self) -> None:
        """No-op on CPU."""

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        await asyncio.to_thread(self.update_weights_sync, list(named_tensors), version)

    async def health(self) -> bool:
        return self._alive

    async def shutdown(self) -> None:
        self._alive = False
        self.abort_all_sync()
        self._gate.set()

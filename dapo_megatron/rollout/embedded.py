"""The embedded rollout engine: a transformers causal LM in this process (the CPU default).

Sampling matches what the trainer assumes (see :mod:`dapo_megatron.rollout.base`): at each step
``logp = log_softmax(logits / T)`` over the full vocabulary; top-k then top-p restrict the candidates
(the kept probabilities are renormalised **for drawing only**), a token is drawn with a seeded
``torch.Generator``, and the reported logprob is ``logp[token]`` of the untruncated distribution.

Decoding is a manual loop over a batch of ``len(prompts) * n`` rows with the model's KV cache
(``past_key_values``, ``use_cache=True``), prompts left-padded, explicit ``position_ids`` so a padded
row sees exactly the positions it would see alone. Finished rows keep riding along (their outputs are
ignored) until every row is done: simpler than compacting the cache, and CPU batches are small.

Concurrency: one ``threading.Lock`` serialises decode loops and weight loads, so a completion is
produced by exactly one set of weights and carries that ``weight_version``. The async methods run the
sync work in worker threads (``asyncio.to_thread``) so an event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from dapo_megatron.rollout.base import Completion, EngineDeadError, NamedTensors, RequestTimeout, SamplingParams

_GATE_POLL_S = 0.02  # how often a request parked by pause() re-checks for an abort


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


def sample_next(logp: Tensor, top_p: float, top_k: int, generator: torch.Generator) -> Tensor:
    """Draw one token per row from ``logp`` ``[B, V]`` (log-probs at temperature T) -> ``[B]`` long.

    top-k keeps the k most probable tokens (ties at the k-th value are kept), then top-p keeps the
    smallest prefix of the sorted renormalised probabilities whose mass reaches ``top_p`` (the most
    probable token is always kept). ``torch.multinomial`` renormalises the kept mass.
    """
    probs = logp.exp()
    vocab = probs.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = torch.where(mass_before >= top_p, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Batch:
    """Left-padded prompts ``[B, L]`` with attention mask and per-row positions."""

    def __init__(self, rows: List[List[int]], pad_id: int, device: str):
        width = max(len(r) for r in rows)
        self.ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            self.ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            self.mask[i, width - len(r) :] = 1
        # Position of each real token counted from the row's own first token (pads get 0).
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.ids, self.mask, self.pos = self.ids.to(device), self.mask.to(device), self.pos.to(device)


class EmbeddedEngine:
    """In-process :class:`~dapo_megatron.rollout.base.RolloutEngine` on a transformers model.

    Args:
        hf_config: a ``PretrainedConfig``, a dict with ``model_type``, or a path to an HF dir/config.
        dtype: parameter dtype (float32 on CPU keeps logprobs comparable to the trainer's).
        seed: initialises the random weights (before any update) and the default sampling seeds.
        device: torch device for the model.
        state_dict: optional HF-named initial weights (otherwise random init from ``seed``).
    """

    def __init__(
        self,
        hf_config: Any,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: str = "cpu",
        state_dict: Optional[Dict[str, Tensor]] = None,
    ):
        from transformers import AutoModelForCausalLM

        self.config = _as_config(hf_config)
        self.device, self.dtype, self.seed = device, dtype, int(seed)
        # fork_rng: building the model must not move the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.to(device).eval()
        self.eos_token_ids = _eos_ids(self.config)
        self.pad_id = int(getattr(self.config, "pad_token_id", None) or 0)
        self._targets = self.model.state_dict(keep_vars=True)  # HF name -> live Parameter/buffer
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._abort_epoch = 0
        self._requests = 0
        self._version = 0
        self._alive = True
        if state_dict is not None:
            self.update_weights_sync(list(state_dict.items()), 0)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
        """Config and weights from an HF directory (``config.json`` + safetensors)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model.config, dtype=dtype, seed=seed, device=device, state_dict=model.state_dict())

    # ------------------------------------------------------------------ sync core
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def abort_epoch(self) -> int:
        """Bumped by every :meth:`abort_all_sync`; pass the value read at request arrival as ``epoch``."""
        return self._abort_epoch

    @property
    def busy(self) -> bool:
        """A decode loop or a weight load is running right now."""
        return self._lock.locked()

    def _default_seed(self) -> int:
        self._requests += 1
        return (self.seed * 1_000_003 + self._requests) % (2**63)

    def generate_sync(
        self,
        prompts: Sequence[List[int]],
        params: SamplingParams,
        *,
        cancel: Optional[threading.Event] = None,
        epoch: Optional[int] = None,
    ) -> List[List[Completion]]:
        """``params.n`` completions for each prompt (``result[p][j]``), decoded together.

        ``cancel`` (this request) or :meth:`abort_all_sync` after ``epoch`` was read cut the
        request short: its unfinished rows come back with ``finish_reason="abort"``.
        """
        if not self._alive:
            raise EngineDeadError("embedded engine is shut down")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        epoch = self._abort_epoch if epoch is None else epoch
        seed = self._default_seed() if params.seed is None else params.seed

        def aborted() -> bool:
            return self._abort_epoch != epoch or (cancel is not None and cancel.is_set())

        # A paused engine parks new requests here; they still honour an abort while parked.
        while not self._gate.wait(_GATE_POLL_S):
            if aborted():
                break
        with self._lock:
            rows = [list(p) for p in prompts for _ in range(params.n)]
            tokens, logps, reasons = self._decode(rows, params, seed, aborted)
            version = self._version
        out = [Completion(t, lp, r, weight_version=version) for t, lp, r in zip(tokens, logps, reasons)]
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _decode(self, rows: List[List[int]], params: SamplingParams, seed: int, aborted) -> Tuple[list, list, list]:
        """The decode loop over ``B = len(rows)`` rows: per-row tokens, logprobs, finish reasons."""
        batch = _Batch(rows, self.pad_id, self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        stop = self.eos_token_ids | set(params.stop_token_ids)
        n_rows = len(rows)
        tokens: List[List[int]] = [[] for _ in range(n_rows)]
        logps: List[List[float]] = [[] for _ in range(n_rows)]
        reasons: List[Optional[str]] = [None] * n_rows
        inp, pos, mask, past = batch.ids, batch.pos, batch.mask, None
        for _ in range(params.max_new_tokens):
            if aborted():
                break
            out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = torch.log_softmax(out.logits[:, -1, :].float() / params.temperature, dim=-1)
            nxt = sample_next(logp, params.top_p, params.top_k, gen)
            chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
            for i, (tok, lp) in enumerate(zip(nxt.tolist(), chosen.tolist())):
                if reasons[i] is not None:
                    continue
                tokens[i].append(tok)
                logps[i].append(lp)
                if tok in stop:
                    reasons[i] = "stop"
                elif len(tokens[i]) >= params.max_new_tokens:
                    reasons[i] = "length"
            if all(r is not None for r in reasons):
                break
            inp = nxt[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        # Rows left unfinished were cut by an abort (the loop only ends early on abort).
        return tokens, logps, [r or "abort" for r in reasons]

    def abort_all_sync(self) -> None:
        """Abort every request started (or parked) before this call; later requests are unaffected."""
        self._abort_epoch += 1

    def update_weights_sync(self, named_tensors: NamedTensors, version: int) -> None:
        """Copy HF-named tensors into the live parameters, then stamp ``version``.

        Names must be the model's own ``state_dict`` names; an unknown name or a shape mismatch
        raises before anything is copied (a mapping bug must not half-load a model). With tied
        embeddings ``lm_head.weight`` and ``model.embed_tokens.weight`` are one tensor, so either
        name loads both (if both are sent, the later one wins).
        """
        items = list(named_tensors)
        for name, t in items:
            target = self._targets.get(name)
            if target is None:
                raise KeyError(f"update_weights: unknown parameter {name!r} for {type(self.model).__name__}")
            if tuple(target.shape) != tuple(t.shape):
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(t.shape)}, model expects {tuple(target.shape)}"
                )
        with self._lock, torch.no_grad():
            for name, t in items:
                target = self._targets[name]
                target.copy_(t.detach().to(device=target.device, dtype=target.dtype))
            self._version = int(version)

    def state_dict(self) -> Dict[str, Tensor]:
        """Detached copies of the current weights, HF names."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ RolloutEngine (async)
    async def generate(
        self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: Optional[float] = None
    ) -> List[Completion]:
        epoch = self._abort_epoch  # read now: an abort_all issued while we wait for the lock applies
        cancel = threading.Event()
        work = asyncio.to_thread(self.generate_sync, [prompt_ids], params, cancel=cancel, epoch=epoch)
        try:
            return (await asyncio.wait_for(work, timeout_s))[0]
        except asyncio.TimeoutError:
            cancel.set()  # the thread cannot be killed; make its loop stop at the next step
            raise RequestTimeout(f"embedded generate exceeded {timeout_s} s") from None
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def abort_all(self) -> None:
        self.abort_all_sync()

    async def pause(self) -> None:
        """New requests wait until :meth:`resume`; requests already decoding finish normally."""
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

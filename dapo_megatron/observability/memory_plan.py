"""Per-GPU memory and FLOPs of a decoder-only model (Qwen2 / Qwen3 / Llama, and Qwen-style MoE), on paper.

Pure python: no torch, no megatron. Units: memory in **bytes** (``gib`` converts to GiB = 2**30
bytes), compute in **FLOPs**, lengths in **tokens**, time in **seconds**.

What is assumed (megatron-core mixed precision, as ``dapo_megatron.megatron.actor`` builds it):

* Parameters in ``params_dtype`` (bf16: 2 B per parameter).
* Gradients: megatron's DDP grad buffer in fp32 (``grad_reduce_in_fp32=True``): 4 B per parameter,
  full size on every data-parallel rank, also with the distributed optimizer (it reduce-scatters
  into the full buffer and all-gathers the bf16 parameters back).
* Optimizer: Adam. With 16-bit parameters the mixed-precision optimizer keeps an fp32 master copy
  plus fp32 ``m`` and ``v``: 12 B per parameter; fp32 parameters need no master copy: 8 B. The
  distributed optimizer shards this state over the DP x CP ranks (megatron's data-parallel group
  with context parallelism). So bf16 costs 2 + 4 + 12 = 18 B per parameter, or 6 + 12 / (DP x CP).
* Activations in ``params_dtype``; dropout 0 (Qwen2 and this project's actor); RMSNorm, SwiGLU,
  RoPE, grouped-query attention; flash attention (no ``s x s`` scores kept) unless told otherwise.
* Vocabulary padded to a multiple of ``128 x TP`` (megatron's default); tied embeddings with PP > 1
  keep a second copy of the embedding as the output layer on the last stage.
* Pipeline: 1F1B (or interleaved with VPP > 1) with at least PP micro-batches per step, the worst
  case for activations. Only the first and the last stage are planned: a middle stage holds less
  than the first one (no embedding, fewer micro-batches in flight).
* Colocated rollout: the engine releases its weights and KV cache while the trainer trains
  (``release_memory_occupation``). With ``offload_trainer`` (``rollout.offload_trainer``, the
  default) the trainer moves its optimizer state and gradients to host memory before the engine
  resumes, and its parameters right after the weight push, which reads them
  (``dapo_megatron.megatron.offload``). So the rollout phase peaks during the push at
  ``params + engine weights + KV cache`` (generation itself holds only the engine), and the peak is
  ``max(trainer state + training extras, params + engine weights + KV cache)``, plus a flat
  per-process overhead. Without it the trainer state stays resident: ``trainer state +
  max(training extras, engine weights + KV cache)``. The offload needs host RAM of about the
  parameters + optimizer state of every trainer rank on the node (pinned), not modelled here.
* Mixture of experts (the sharding is in :mod:`memory_params`): the distributed optimizer shards the
  expert state over the expert-data-parallel group (``world / (etp * ep * pp)``), the rest over
  DP x CP; the gradient buffers stay full size for both. Routing is assumed balanced: every GPU's
  experts receive the average ``tokens * top_k`` rows (a hot expert makes one rank hold more).
* Not modelled: allocator fragmentation, NCCL and CP ring buffers beyond the flat overhead,
  gradients of the layer being recomputed, the MoE all-to-all staging buffers, token dropping.
  Treat a small headroom as "does not fit".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from dapo_megatron.observability.memory_params import (
    DTYPE_BYTES,
    GIB,
    PRESETS,
    PUBLISHED_ACTIVE_PARAMS,
    PUBLISHED_PARAMS,
    Layout,
    ModelShape,
    _divides,
    _positive,
    active_param_count,
    check_layout,
    dtype_bytes,
    expert_layer_params,
    gib,
    layer_params,
    padded_vocab,
    param_count,
    preset,
    shape_from_hf_config,
    stage_expert_params,
    stage_params,
)

# The shape and layout names live in memory_params; they are re-exported so one import serves the tools.
__all__ = [
    "DTYPE_BYTES", "GIB", "PRESETS", "PUBLISHED_ACTIVE_PARAMS", "PUBLISHED_PARAMS", "RECOMPUTE", "FlopsPerToken",
    "Layout", "MemoryPlan", "ModelShape", "Rollout", "StagePlan", "Workload", "activation_bytes",
    "active_param_count", "alltoall_bytes", "check_engine", "check_layout", "dtype_bytes", "engine_weight_bytes",
    "expert_layer_params", "flops_per_token", "gib", "inflight_layers", "kv_bytes_per_token", "kv_cache_bytes",
    "layer_activation_bytes", "layer_params", "logits_bytes", "matmul_params", "padded_vocab", "param_count",
    "plan_memory", "plan_stage", "preset", "shape_from_hf_config", "stage_expert_params", "stage_params",
    "state_bytes_per_param", "step_time_s", "stored_layer_bytes", "tokens_per_s_per_gpu",
]  # fmt: skip

RECOMPUTE = ("none", "selective", "full")


# ----------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """One training micro-batch: ``micro_batch`` sequences of ``seq_len`` tokens (prompt + response)."""

    seq_len: int
    micro_batch: int = 1
    recompute: str = "none"
    params_dtype: str = "bf16"
    flash_attention: bool = True
    logprob_chunk: int = 1024

    def __post_init__(self) -> None:
        _positive(self, "seq_len", "micro_batch", "logprob_chunk")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}")
        dtype_bytes(self.params_dtype)

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element."""
        return dtype_bytes(self.params_dtype)


def state_bytes_per_param(params_dtype: str) -> tuple[int, int, int]:
    """``(weights, gradients, optimizer state)`` bytes per parameter before any DP sharding."""
    p = dtype_bytes(params_dtype)
    return p, 4, (12 if p < 4 else 8)  # fp32 main grads; master + m + v (no master copy for fp32)


def layer_activation_bytes(shape: ModelShape, layout: Layout, work: Workload) -> float:
    """Bytes one layer keeps for backward, per GPU and micro-batch, without recompute.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    ``s*b*h*(34 + 5*a*s/h)`` bytes per 16-bit GPT layer (MHA, 4h GELU MLP, dropout), made of
    attention ``11sbh + 5as^2b`` (QKV input 2, Q and K 4, softmax output 2as^2b, its dropout mask
    as^2b and output 2as^2b, V 2, out-projection input 2, dropout mask 1, in units of sbh), MLP
    ``19sbh`` (fc1 input 2, GELU input 8, fc2 input 8, dropout mask 1) and two LayerNorm inputs
    ``4sbh``. With TP t and sequence parallelism everything is divided by t; without it the norm
    inputs, linear inputs and dropout masks (10sbh) stay whole.

    Adapted to a Qwen2 layer, counted in elements per token then times the activation size:
      * dropout is 0, so no masks and no dropout outputs;
      * GQA: K and V are ``g*d`` wide each, so Q, K, V keep ``h + 2*g*d`` (not 3h);
      * SwiGLU: fc1's ``2f``-wide output (gate, up) is kept for the SwiGLU backward and its ``f``-wide
        result is fc2's input: ``3f`` (GELU's 4h input + 4h output becomes 2f + f);
      * flash attention keeps only its output (the out-projection input, h) and an fp32 log-sum-exp
        per head and token, never the scores; without flash attention the bf16 softmax output
        (``a*s`` per token, no dropout copy) stays: the ``2as^2b`` bytes of the paper's 5as^2b;
      * RMSNorm keeps its input, like LayerNorm.
    So per token: ``4h`` kept whole unless sequence parallel (two norm inputs, QKV and fc1 inputs)
    and ``h + 2gd + h + 3f`` split by TP (Q, K+V, attention output, fc1 output + fc2 input).
    Context parallelism divides the tokens per GPU by CP. A MoE layer replaces ``3f`` by
    :func:`moe_activation_elements`.
    """
    t, tokens = layout.tp, work.micro_batch * work.seq_len / layout.cp
    whole = 4 * shape.hidden
    split = 2 * shape.q_dim + 2 * shape.kv_dim + (0 if shape.is_moe else 3 * shape.ffn_hidden)
    per_token = (whole / t if layout.sequence_parallel else whole) + split / t + moe_activation_elements(shape, layout)
    n = tokens * per_token * work.act_bytes
    if work.flash_attention:
        n += tokens * (shape.num_heads / t) * 4  # fp32 log-sum-exp per head
    else:
        n += tokens * (shape.num_heads / t) * work.seq_len * work.act_bytes  # softmax output, a*s per token
    return n


def moe_activation_elements(shape: ModelShape, layout: Layout) -> float:
    """Elements one MoE layer's MLP keeps per token (per GPU, tokens before the TP split); 0 if dense.

    megatron trains MoE at TP > 1 only with sequence parallelism, so a GPU routes ``T/tp`` tokens; the
    all-to-all spreads their ``top_k`` copies over the EP ranks and the expert-TP all-gather collects
    ``etp`` ranks' rows, so with balanced routing a GPU's experts hold ``T * k * etp / tp`` rows, each
    keeping its input ``h``, fc1's output ``2f_m/etp``, the SwiGLU output ``f_m/etp`` (for the routing
    probability's gradient) and the probability-weighted fc2 input ``f_m/etp``. Per token also the
    router's logits and scores (``2E``) and the shared expert's ``3f_s``, both split by TP.
    """
    if not shape.is_moe:
        return 0.0
    etp, k = layout.expert_tp, shape.top_k
    routed = k * (etp * shape.hidden + 4 * shape.moe_ffn_hidden) / layout.tp
    return routed + (2 * shape.num_experts + 3 * shape.shared_ffn_hidden) / layout.tp


def stored_layer_bytes(shape: ModelShape, layout: Layout, work: Workload) -> float:
    """Bytes one layer keeps between its forward and backward under ``work.recompute``.

    * ``none``: everything of :func:`layer_activation_bytes`.
    * ``selective`` (megatron's core-attention recompute): drops the ``s x s`` softmax term; with
      flash attention it saves nothing more, since flash keeps no scores anyway.
    * ``full`` (uniform, one layer per unit): only the layer input, ``h`` per token (split by TP
      with sequence parallelism); the layer is run again during backward.
    """
    if work.recompute == "full":
        per_token = shape.hidden / (layout.tp if layout.sequence_parallel else 1)
        return work.micro_batch * work.seq_len / layout.cp * per_token * work.act_bytes
    if work.recompute == "selective" and not work.flash_attention:
        return layer_activation_bytes(shape, layout, replace(work, flash_attention=True))
    return layer_activation_bytes(shape, layout, work)


def inflight_layers(shape: ModelShape, layout: Layout, stage: int) -> int:
    """Layer-micro-batches whose activations pipeline ``stage`` holds at its peak.

    1F1B: stage r runs ``pp - r`` forward micro-batches before its first backward, each over
    ``L/pp`` layers, so stage 0 holds ``L`` layers' worth. Interleaved (VPP v): megatron's warm-up is
    ``2*(pp - r - 1) + (v - 1)*pp`` model chunks plus the one in flight, each ``L/(pp*v)`` layers
    (stage 0: ``L*(1 + (pp-1)/(pp*v))``, the paper's figure).
    """
    p, v = layout.pp, layout.vpp
    if v == 1:
        return (p - stage) * (shape.num_layers // p)
    chunks = 2 * (p - stage - 1) + (v - 1) * p + 1
    return chunks * (shape.num_layers // (p * v))


def activation_bytes(shape: ModelShape, layout: Layout, work: Workload, stage: int) -> float:
    """Peak activation bytes per GPU of ``stage``: the in-flight layers' stored activations, plus
    (full recompute) one layer re-materialised during backward, plus (last stage) the final norm
    and output-layer inputs (2h per token, split by TP with sequence parallelism)."""
    n = inflight_layers(shape, layout, stage) * stored_layer_bytes(shape, layout, work)
    if work.recompute == "full":
        n += layer_activation_bytes(shape, layout, work)
    if stage == layout.pp - 1:
        tokens = work.micro_batch * work.seq_len / layout.cp
        n += tokens * 2 * shape.hidden / (layout.tp if layout.sequence_parallel else 1) * work.act_bytes
    return n


def logits_bytes(shape: ModelShape, layout: Layout, work: Workload, stage: int) -> float:
    """Logits buffer bytes on the last stage (0 elsewhere): the ``[tokens, V/tp]`` logits in the
    params dtype, their gradient of the same size, and the fp32 chunk temporaries of the log-prob /
    entropy kernel (``dapo_megatron.megatron.logprobs``: about four ``[chunk, V/tp]`` fp32 arrays alive
    at once: the scaled logits, their exp (or p), the finite-masked copy and a product)."""
    if stage != layout.pp - 1:
        return 0.0
    tokens = work.micro_batch * work.seq_len / layout.cp
    vocab_shard = padded_vocab(shape.vocab_size, layout.tp, layout.vocab_multiple) / layout.tp
    chunk = min(work.logprob_chunk, tokens)
    return 2 * tokens * vocab_shard * work.act_bytes + 4 * chunk * vocab_shard * 4


# ----------------------------------------------------------------------------- rollout engine
@dataclass(frozen=True)
class Rollout:
    """The generation engine: on the trainer's GPUs (``colocated``) or on GPUs of its own.

    Size the KV cache with ``kv_cache_tokens`` (tokens the pool of one engine holds) or with
    ``mem_fraction`` (SGLang's ``mem_fraction_static``: weights + KV pool = fraction x GPU memory;
    SGLang counts memory other processes hold at its start-up against this fraction).
    """

    colocated: bool = True
    engine_tp: int = 1
    kv_cache_tokens: Optional[int] = None
    mem_fraction: Optional[float] = None
    kv_dtype: str = "bf16"
    weights_dtype: str = "bf16"
    offload_trainer: bool = True  # colocated: the trainer's state waits in host memory (see the module doc)

    def __post_init__(self) -> None:
        _positive(self, "engine_tp")
        if (self.kv_cache_tokens is None) == (self.mem_fraction is None):
            raise ValueError("give exactly one of kv_cache_tokens and mem_fraction")
        if self.mem_fraction is not None and not 0 < self.mem_fraction < 1:
            raise ValueError(f"mem_fraction={self.mem_fraction} must be in (0, 1)")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} must be >= 0")


def check_engine(shape: ModelShape, rollout: Rollout) -> None:
    """Raise ValueError when an engine could not shard ``shape`` over ``engine_tp`` GPUs."""
    _divides(shape.num_heads, rollout.engine_tp, "num_heads", "engine_tp")
    if shape.num_kv_heads < rollout.engine_tp:  # KV heads are replicated, each GPU keeps one
        _divides(rollout.engine_tp, shape.num_kv_heads, "engine_tp", "num_kv_heads")
    else:
        _divides(shape.num_kv_heads, rollout.engine_tp, "num_kv_heads", "engine_tp")


def kv_bytes_per_token(shape: ModelShape, engine_tp: int, kv_dtype: str = "bf16") -> int:
    """KV cache bytes per token per GPU: ``2 (K, V) * layers * kv_heads_per_gpu * head_dim * bytes``,
    where ``kv_heads_per_gpu = kv_heads / engine_tp`` (at least 1: fewer KV heads than GPUs are
    replicated)."""
    heads = max(1, shape.num_kv_heads // engine_tp)
    return 2 * shape.num_layers * heads * shape.head_dim * dtype_bytes(kv_dtype)


def engine_weight_bytes(shape: ModelShape, rollout: Rollout) -> int:
    """Engine weight bytes per GPU: the model TP-sharded over ``engine_tp`` GPUs, one stage (MoE: each
    expert split over the ``engine_tp`` GPUs too, SGLang's default without expert parallelism)."""
    return stage_params(shape, Layout(tp=rollout.engine_tp), 0) * dtype_bytes(rollout.weights_dtype)


def kv_cache_bytes(shape: ModelShape, rollout: Rollout, gpu_mem: float) -> float:
    """KV pool bytes per GPU; from ``mem_fraction`` it is ``fraction * gpu_mem - weights`` (>= 0)."""
    if rollout.kv_cache_tokens is not None:
        return float(rollout.kv_cache_tokens * kv_bytes_per_token(shape, rollout.engine_tp, rollout.kv_dtype))
    assert rollout.mem_fraction is not None
    return max(0.0, rollout.mem_fraction * gpu_mem - engine_weight_bytes(shape, rollout))


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class StagePlan:
    """Bytes per GPU of one pipeline stage, item by item (engine items are 0 unless colocated)."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    engine_weights: float = 0.0
    kv_cache: float = 0.0
    overhead: float = 0.0
    trainer_offloaded: bool = False  # colocated with offload_trainer: only params meet the engine

    @property
    def state(self) -> float:
        """Trainer memory that stays allocated across phases (params, grads, optimizer)."""
        return self.params + self.grads + self.optimizer

    @property
    def train_total(self) -> float:
        """Bytes in use while the trainer runs forward/backward."""
        return self.state + self.activations + self.logits + self.overhead

    @property
    def rollout_resident(self) -> float:
        """Trainer bytes on the GPU while a colocated engine holds it: the parameters (the weight push
        reads them after the engine resumed) when offloaded, else the whole state."""
        return self.params if self.trainer_offloaded else self.state

    @property
    def rollout_total(self) -> float:
        """Bytes in use at the rollout phase's peak (the weight push into a resumed colocated engine)."""
        return self.rollout_resident + self.engine_weights + self.kv_cache + self.overhead

    @property
    def peak(self) -> float:
        """The larger of the two phases."""
        return max(self.train_total, self.rollout_total)


@dataclass(frozen=True)
class MemoryPlan:
    """The planned stages (first and last), the GPU size and, for a separate engine, its GPU's items."""

    shape: ModelShape
    layout: Layout
    work: Workload
    gpu_mem: float
    stages: tuple[StagePlan, ...]
    rollout: Optional[Rollout] = None
    engine_gpu: Dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        """Worst bytes per GPU over the planned stages (and the engine GPU, when separate)."""
        return max([s.peak for s in self.stages] + [sum(self.engine_gpu.values())])

    @property
    def headroom(self) -> float:
        """GPU memory left at the peak, bytes (negative: does not fit)."""
        return self.gpu_mem - self.peak

    @property
    def fits(self) -> bool:
        """True when the peak is within the GPU memory."""
        return self.headroom >= 0


def plan_stage(shape: ModelShape, layout: Layout, work: Workload, stage: int, overhead: float) -> StagePlan:
    """Trainer items of one stage (no engine), bytes per GPU. The distributed optimizer shards the
    dense parameters' state over DP x CP and the experts' over the expert-data-parallel group."""
    n, experts = stage_params(shape, layout, stage), stage_expert_params(shape, layout)
    p, g, o = state_bytes_per_param(work.params_dtype)
    dist = layout.distributed_optimizer
    optimizer = (n - experts) * o / (layout.dp * layout.cp if dist else 1) + experts * o / (
        layout.expert_dp if dist else 1
    )
    return StagePlan(
        stage=stage,
        params=float(n * p),
        grads=float(n * g),
        optimizer=optimizer,
        activations=activation_bytes(shape, layout, work, stage),
        logits=logits_bytes(shape, layout, work, stage),
        overhead=overhead,
    )


def plan_memory(
    shape: ModelShape,
    layout: Layout,
    work: Workload,
    gpu_mem: float,
    rollout: Optional[Rollout] = None,
    overhead: float = 2.0 * GIB,
) -> MemoryPlan:
    """Per-GPU memory plan. ``gpu_mem`` and ``overhead`` in bytes; ``overhead`` is a flat guess per
    process (CUDA context, NCCL communicators, workspaces), counted once for the trainer and once
    more for a colocated engine process, which keeps its context while its memory is released."""
    check_layout(shape, layout, work.seq_len)
    if rollout is not None:
        check_engine(shape, rollout)
    stages = [plan_stage(shape, layout, work, s, overhead) for s in sorted({0, layout.pp - 1})]
    engine_gpu: Dict[str, float] = {}
    if rollout is not None:
        weights, kv = float(engine_weight_bytes(shape, rollout)), kv_cache_bytes(shape, rollout, gpu_mem)
        if rollout.colocated:
            stages = [replace(s, engine_weights=weights, kv_cache=kv, overhead=2 * overhead,
                              trainer_offloaded=rollout.offload_trainer) for s in stages]  # fmt: skip
        else:
            engine_gpu = {"engine_weights": weights, "kv_cache": kv, "overhead": overhead}
    return MemoryPlan(shape, layout, work, float(gpu_mem), tuple(stages), rollout, engine_gpu)


# ----------------------------------------------------------------------------- FLOPs and time
@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per trained token. ``model``: forward + backward (3 x forward), the work MFU counts;
    ``hardware``: plus the forward recomputed under full recompute; ``forward``: one forward pass
    (the old-policy log-prob pass)."""

    forward: float
    model: float
    hardware: float


def matmul_params(shape: ModelShape) -> int:
    """Parameters that cost FLOPs per token: every layer's weights plus the output layer (``V*h``,
    also when tied); the embedding lookup and norms are free. MoE: the router (``E*h``) and the
    ``top_k`` experts a token is routed to, not all ``E``."""
    split, _ = layer_params(shape)
    if shape.is_moe:
        split += shape.num_experts * shape.hidden + shape.top_k * 3 * shape.hidden * shape.moe_ffn_hidden
    return shape.num_layers * split + shape.vocab_size * shape.hidden


def flops_per_token(shape: ModelShape, seq_len: int, recompute: str = "none", causal: bool = True) -> FlopsPerToken:
    """The ``6N + attention`` estimate. A forward pass costs ``2N`` (one multiply-add per weight)
    plus, per layer, ``QK^T`` and ``AV`` over the token's context: ``2 * 2 * ctx * a * d``. With a
    causal mask the average context is ``seq_len / 2`` (flash attention skips masked blocks), so the
    attention forward is ``2 * L * seq_len * a * d`` (``causal=False``: twice that, megatron's count).
    Backward costs twice the forward."""
    ctx = seq_len / 2 if causal else seq_len
    forward = 2 * matmul_params(shape) + 4 * shape.num_layers * ctx * shape.q_dim
    model = 3 * forward
    return FlopsPerToken(forward=forward, model=model, hardware=model + (forward if recompute == "full" else 0))


def tokens_per_s_per_gpu(flops_per_tok: float, peak_flops: float, mfu: float) -> float:
    """Tokens per second one GPU processes at ``mfu`` (fraction of ``peak_flops``, FLOP/s)."""
    return mfu * peak_flops / flops_per_tok


def step_time_s(tokens: float, tokens_per_s_per_gpu: float, gpus: int) -> float:
    """Seconds to process ``tokens`` on ``gpus`` GPUs each doing ``tokens_per_s_per_gpu``."""
    return tokens / (tokens_per_s_per_gpu * gpus)


# ----------------------------------------------------------------------------- MoE all-to-all
def alltoall_bytes(shape: ModelShape, layout: Layout, tokens: float, act_bytes: int, recompute: str = "none") -> float:
    """Bytes one GPU sends to other EP ranks for one MoE layer over ``tokens`` tokens, forward + backward.

    ``tokens``: the tokens of this GPU's micro-batches (per CP rank, before the TP split: the
    ``micro_batch * seq_len / cp`` of one micro-batch, or a step's ``tokens / (dp * cp)``). With
    sequence parallelism a GPU routes ``tokens / tp`` of them, each to ``top_k`` experts, so one
    all-to-all moves ``tokens/tp * top_k * h * act_bytes``, of which ``(ep - 1) / ep`` leaves the GPU
    (balanced routing). A layer runs four: dispatch and combine forward, their gradients backward;
    six under full recompute (the forward runs twice). 0 for a dense model or ``ep == 1``.
    """
    if not shape.is_moe or layout.ep == 1:
        return 0.0
    one = tokens / layout.tp * shape.top_k * shape.hidden * act_bytes * (layout.ep - 1) / layout.ep
    return one * (6 if recompute == "full" else 4)

"""The memory plan as text, and the plan of a run config: shared by ``tools/plan_memory.py`` and
``dapo-megatron plan``.

Pure python over :mod:`memory_plan`; the config is read by attribute (``cfg.parallel``, ``cfg.model``,
``cfg.rollout``, ``cfg.train``), so this module imports no config code.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional

from dapo_megatron.observability import memory_plan as mp


def load_hf_shape(path: str) -> mp.ModelShape:
    """The shape of an HF ``config.json`` (or of the folder holding one), named after its folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return mp.shape_from_hf_config(json.load(f), name=os.path.basename(os.path.dirname(os.path.abspath(path))))


def plan_from_config(cfg: Any, shape: mp.ModelShape, world: int, gpu_mem: float, overhead: float) -> mp.MemoryPlan:
    """The memory plan of a run config on ``world`` trainer GPUs of ``gpu_mem`` bytes.

    Layout from ``cfg.parallel`` (DP = world / (TP * PP * CP); expert-TP from
    ``parallel.expert_tensor_parallel`` when the config has it, else megatron's default, TP); one
    micro-batch of ``train.max_tokens_per_microbatch`` tokens when packing by tokens (at least the
    longest sequence, which goes alone), else ``train.micro_batch_size`` sequences of
    ``max_prompt_len + max_response_len``; the engine from ``cfg.rollout`` (none for ``embedded``,
    which runs inside trainer rank 0).
    """
    par, model, ro, train = cfg.parallel, cfg.model, cfg.rollout, cfg.train
    model_parallel = par.tensor * par.pipeline * par.context
    if world < 1 or world % model_parallel:
        raise ValueError(f"trainer world size {world} is not a multiple of tensor*pipeline*context={model_parallel}")
    layout = mp.Layout(
        tp=par.tensor, pp=par.pipeline, dp=world // model_parallel, cp=par.context, vpp=par.virtual_pipeline,
        sequence_parallel=par.sequence_parallel, distributed_optimizer=par.use_distributed_optimizer,
        ep=par.expert, etp=par.expert_tensor,
    )  # fmt: skip
    seq = ro.max_prompt_len + ro.max_response_len
    packed = train.max_tokens_per_microbatch > 0
    work = mp.Workload(
        seq_len=max(seq, train.max_tokens_per_microbatch) if packed else seq,
        micro_batch=1 if packed else train.micro_batch_size,
        recompute=model.recompute_granularity or "none",
        params_dtype=model.params_dtype,
        logprob_chunk=train.logprob_chunk_size,
    )
    rollout = None
    if ro.engine != "embedded":
        rollout = mp.Rollout(colocated=ro.mode == "colocated", engine_tp=ro.engine_tensor_parallel,
                             mem_fraction=ro.mem_fraction_static, offload_trainer=ro.offload_trainer)  # fmt: skip
    return mp.plan_memory(shape, layout, work, gpu_mem, rollout=rollout, overhead=overhead)


def _model_line(s: mp.ModelShape) -> str:
    line = (
        f"model   {s.name or 'custom'}: {mp.param_count(s) / 1e9:.2f} B params, {s.num_layers} layers, hidden "
        f"{s.hidden}, "
    )
    if s.is_moe:
        shared = f" + shared {s.shared_ffn_hidden}" if s.shared_ffn_hidden else ""
        line += (
            f"MoE {s.num_experts} experts top-{s.top_k} of width {s.moe_ffn_hidden}{shared} "
            f"({mp.active_param_count(s) / 1e9:.2f} B active), "
        )
    else:
        line += f"ffn {s.ffn_hidden}, "
    return (
        line + f"heads {s.num_heads}/{s.num_kv_heads} kv, vocab {s.vocab_size}{', tied' if s.tied_embeddings else ''}"
    )


def header(plan: mp.MemoryPlan) -> List[str]:
    """Lines describing the model, layout, batch and engine (KV in KiB per token and in tokens)."""
    s, lay, w = plan.shape, plan.layout, plan.work
    opt = "distributed (DP x CP shards)" if lay.distributed_optimizer else "replicated"
    gpus = f"{lay.world_size} GPU{'s' * (lay.world_size > 1)}"
    experts = f", EP{lay.ep} ETP{lay.expert_tp} (expert DP {lay.expert_dp})" if s.is_moe else ""
    lines = [
        _model_line(s),
        f"layout  TP{lay.tp} PP{lay.pp} DP{lay.dp} CP{lay.cp} VPP{lay.vpp} = {gpus}{experts}, sequence parallel "
        f"{'on' if lay.sequence_parallel else 'off'}, optimizer {opt}",
        f"batch   micro-batch {w.micro_batch} x {w.seq_len} tokens, recompute {w.recompute}, {w.params_dtype} params, "
        f"fp32 grads and Adam, {'flash' if w.flash_attention else 'unfused'} attention",
    ]
    r = plan.rollout
    if r is not None:
        kv = mp.kv_cache_bytes(s, r, plan.gpu_mem)
        per_tok = mp.kv_bytes_per_token(s, r.engine_tp, r.kv_dtype)
        size = f"mem fraction {r.mem_fraction:.2f}" if r.mem_fraction is not None else f"{r.kv_cache_tokens} tokens"
        lines.append(
            f"rollout {'colocated' if r.colocated else 'separate GPUs'}, engine TP {r.engine_tp}, {size}: KV "
            f"{per_tok / 1024:.0f} KiB/token/GPU, pool {kv / per_tok:,.0f} tokens per engine "
            f"= {kv / per_tok / w.seq_len:.1f} sequences of {w.seq_len}"
        )
    return lines


def table(plan: mp.MemoryPlan) -> List[str]:
    """The GiB-per-GPU table: one column per planned pipeline stage."""
    st = plan.stages
    cols = [f"stage {s.stage}" for s in st]
    rows = [
        ("params", "params"),
        ("grads (fp32)", "grads"),
        ("optimizer state", "optimizer"),
        ("activations", "activations"),
        ("logits buffer", "logits"),
    ]
    if plan.rollout is not None and plan.rollout.colocated:
        rows += [("engine weights (rollout)", "engine_weights"), ("KV cache (rollout)", "kv_cache"),
                 ("trainer kept (rollout)", "rollout_resident")]  # fmt: skip
    rows += [("overhead (assumed)", "overhead"), ("= training phase", "train_total")]
    if plan.rollout is not None and plan.rollout.colocated:
        rows.append(("= rollout phase", "rollout_total"))
    rows.append(("peak", "peak"))
    out = [f"{'GiB per GPU':<26}" + "".join(f"{c:>10}" for c in cols)]
    out += [f"{label:<26}" + "".join(f"{mp.gib(getattr(s, attr)):>10.2f}" for s in st) for label, attr in rows]
    if plan.engine_gpu:
        out.append(
            "engine GPU: "
            + ", ".join(f"{k} {mp.gib(v):.2f}" for k, v in plan.engine_gpu.items())
            + f" = {mp.gib(sum(plan.engine_gpu.values())):.2f}"
        )
    out.append(f"{'GPU memory':<26}{mp.gib(plan.gpu_mem):>10.2f}")
    return out


def moe_lines(plan: mp.MemoryPlan, tokens_per_step: Optional[float] = None) -> List[str]:
    """Expert parameters per GPU and the all-to-all volume (MiB = 2**20 bytes); [] for a dense model."""
    s, lay, w = plan.shape, plan.layout, plan.work
    if not s.is_moe:
        return []
    experts = mp.stage_expert_params(s, lay)
    layers = s.num_layers // lay.pp
    per_mb = mp.alltoall_bytes(s, lay, w.micro_batch * w.seq_len / lay.cp, w.act_bytes, w.recompute)
    lines = [
        f"experts {s.num_experts // lay.ep} of {s.num_experts} per EP rank, {experts / 1e9:.2f} B expert params "
        f"per GPU ({mp.gib(experts * w.act_bytes):.2f} GiB), optimizer state sharded over expert DP {lay.expert_dp}",
        f"a2a     {per_mb / 2**20:,.1f} MiB sent per GPU per MoE layer per micro-batch (dispatch + combine, "
        f"forward + backward), {layers * per_mb / mp.GIB:,.2f} GiB over the stage's {layers} layers",
    ]
    if tokens_per_step:
        step = layers * mp.alltoall_bytes(s, lay, tokens_per_step / (lay.dp * lay.cp), w.act_bytes, w.recompute)
        lines.append(f"        step of {tokens_per_step:,.0f} tokens: {mp.gib(step):,.1f} GiB sent per GPU")
    return lines


def where_peak(plan: mp.MemoryPlan) -> str:
    """Which stage and phase (or the engine GPU) sets the peak."""
    if plan.engine_gpu and sum(plan.engine_gpu.values()) >= max(s.peak for s in plan.stages):
        return "the engine GPU"
    s = max(plan.stages, key=lambda x: x.peak)
    phase = "rollout" if s.rollout_total > s.train_total else "training"
    return f"stage {s.stage}, {phase} phase"


def verdict(plan: mp.MemoryPlan) -> str:
    """Fits / does not fit, with the headroom in GiB and as a fraction of the GPU."""
    room, frac = mp.gib(plan.headroom), plan.headroom / plan.gpu_mem
    where = where_peak(plan)
    if not plan.fits:
        return f"verdict DOES NOT FIT: peak {mp.gib(plan.peak):.2f} GiB ({where}) exceeds the GPU by {-room:.2f} GiB"
    note = " - tight: allocator fragmentation is not modelled" if frac < 0.1 else ""
    return f"verdict FITS: peak {mp.gib(plan.peak):.2f} GiB ({where}), headroom {room:.2f} GiB ({frac:.0%}){note}"


def report(plan: mp.MemoryPlan, tokens_per_step: Optional[float] = None) -> List[str]:
    """Header, MoE lines, table and verdict."""
    return header(plan) + moe_lines(plan, tokens_per_step) + [""] + table(plan) + [verdict(plan)]


def config_report(
    cfg: Any, world: int, preset_name: Optional[str] = None, gpu_mem_gib: float = 80.0
) -> tuple[List[str], Optional[bool]]:
    """``dapo-megatron plan``'s memory section: the lines and whether it fits (None: not planned).

    The shape is the preset ``preset_name`` or ``model.hf_path``'s config.json; with neither (a recipe
    whose model folder is not on this machine) or a layout the planner cannot model, the lines say
    why and nothing is planned: the placement stays the command's answer.
    """
    title = f"memory plan (per GPU of {gpu_mem_gib:g} GiB, on paper; tools/plan_memory.py takes the flags)"
    path = os.path.join(cfg.model.hf_path, "config.json")
    if preset_name is None and not (cfg.model.hf_path and os.path.isfile(path)):
        return [f"memory plan: skipped, no {path} (model.hf_path); --model-preset NAME plans a built-in shape"], None
    try:
        shape = mp.preset(preset_name) if preset_name is not None else load_hf_shape(path)
        plan = plan_from_config(cfg, shape, world, gpu_mem_gib * mp.GIB, 2.0 * mp.GIB)
    except ValueError as e:
        return [f"memory plan: not made: {e}"], None
    return [title] + report(plan), plan.fits

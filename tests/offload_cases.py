"""Rank functions of the trainer-offload tests (run by tests.distributed_harness).

Each case builds the real megatron actor twice from the same seed: once training two updates
straight, once offloading everything between them (optimizer + grads, then params, as the loop's
weight sync does) and reloading. It returns what the test compares: losses, weights and Adam state
of both, the storage sizes seen while offloaded, and the bytes moved.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from tests.actor_cases import SEED, TINY_HF, finish, make_batch, start, sub_configs, teardown


def _actor(topology, dtype: str, distopt: bool):
    """The tests' tiny Qwen2 actor (actor_cases.make_actor) with ``params_dtype`` = ``dtype``."""
    from dataclasses import replace

    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_model_parallel

    init_model_parallel(topology, seed=SEED)
    model, optim, train, algo = sub_configs()
    return MegatronActor(
        model_spec_from_hf(TINY_HF), topology, model_cfg=replace(model, params_dtype=dtype), optim_cfg=optim,
        train_cfg=train, algo_cfg=algo, max_response_len=24, total_steps=4, prompts_per_step=4, group_size=2,
        use_distributed_optimizer=distopt,
    )  # fmt: skip


def _state(actor) -> Dict[str, torch.Tensor]:
    """Clones of every parameter, main param and optimizer-state tensor of this rank, by a stable name."""
    from dapo_megatron.megatron.offload import _torch_optimizers

    out = {f"param.{i}": p.detach().clone() for i, p in enumerate(p for c in actor.ddp_chunks for p in c.parameters())}
    for j, opt in enumerate(_torch_optimizers(actor.optimizer)):
        for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            out[f"opt{j}.main.{i}"] = p.detach().clone()
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    out[f"opt{j}.state.{i}.{k}"] = v.detach().clone()
    return out


def _unique_storage_bytes(tensors: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (deduplicated by their base address)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes() > 0:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _one_layout(world: int, dtype: str, distopt: bool) -> dict:
    from dapo_megatron.megatron.offload import grad_tensors, model_tensors, optimizer_tensors
    from dapo_megatron.parallel.topology import Topology

    topo = Topology(world_size=world, tp=1, pp=1, vpp=1, cp=1, ep=1)
    batch = make_batch()
    runs = {}
    for offload in (False, True):
        actor = _actor(topo, dtype, distopt)
        losses = [actor.train_step(batch, temperature=1.0)["loss"]]
        info = {}
        if offload:
            chunks, opt = actor.ddp_chunks, actor.optimizer
            before = _state(actor)
            params, grads = model_tensors(chunks), grad_tensors(chunks, opt)
            opt_only = [t for t in optimizer_tensors(opt) if t.untyped_storage().data_ptr() not in
                        {p.untyped_storage().data_ptr() for p in params}]  # fmt: skip
            expect = {k: _unique_storage_bytes(v) for k, v in (("params", params), ("grads", grads), ("opt", opt_only))}
            first = actor.offload(("optimizer", "grads"))
            info["params_kept_for_sync"] = all(p.untyped_storage().nbytes() > 0 for p in params)
            info["opt_grads_freed"] = all(t.untyped_storage().nbytes() == 0 for t in grads + opt_only)
            second = actor.offload(("params",))
            info["all_freed"] = all(t.untyped_storage().nbytes() == 0 for t in params + grads + opt_only)
            try:
                actor.compute_logprobs(batch, temperature=1.0)
                info["refused_while_offloaded"] = ""
            except RuntimeError as e:
                info["refused_while_offloaded"] = str(e)
            info.update(first=first, second=second, held=actor.offloaded_bytes, expect=expect)
            info["reloaded"] = actor.reload()
            after = _state(actor)
            info["state_bitwise"] = before.keys() == after.keys() and all(
                torch.equal(before[k], after[k]) for k in before
            )
            info["numel"] = sum(p.numel() for c in chunks for p in c.parameters())
        losses.append(actor.train_step(batch, temperature=1.0)["loss"])
        runs[offload] = {"losses": losses, "state": _state(actor), **info}
        teardown()
    plain, off = runs[False], runs[True]
    same = plain["state"].keys() == off["state"].keys() and all(
        torch.equal(plain["state"][k], off["state"][k]) for k in plain["state"]
    )
    return {**{k: v for k, v in off.items() if k != "state"}, "plain_losses": plain["losses"], "final_bitwise": same}


def offload_case(rank: int, world: int, tmp: str, layouts: List[Tuple[str, bool]]) -> dict:
    """Every ``(params_dtype, distributed_optimizer)`` layout at DP = ``world``."""
    start()
    try:
        return {f"{dtype}/{'distopt' if d else 'plain'}": _one_layout(world, dtype, d) for dtype, d in layouts}
    finally:
        finish()


def gpu_offload_case(rank: int, world: int, tmp: str) -> dict:
    """On CUDA: ``torch.cuda.memory_allocated`` / ``memory_reserved`` around each offload phase of a
    bf16 actor after one update, the seconds of each phase, and the CPU cases' bitwise checks."""
    import time

    from dapo_megatron.parallel.topology import Topology

    start()
    try:
        out = {"bitwise": _one_layout(world, "bfloat16", False)}
        actor = _actor(Topology(world_size=world, tp=1, pp=1, vpp=1, cp=1, ep=1), "bfloat16", False)
        actor.train_step(make_batch(), temperature=1.0)
        torch.cuda.synchronize()
        mem = [("trained", torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), 0.0, 0)]
        for phase, call in (("opt+grads", lambda: actor.offload(("optimizer", "grads"))),
                            ("params", lambda: actor.offload(("params",))), ("reload", actor.reload)):  # fmt: skip
            t0 = time.perf_counter()
            moved = call()
            torch.cuda.synchronize()
            mem.append(
                (phase, torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), time.perf_counter() - t0, moved)
            )
        out["memory"] = mem
        teardown()
        return out
    finally:
        finish()

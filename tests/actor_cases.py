"""Rank functions and fixtures for the Megatron actor tests (run by tests.distributed_harness).

Everything megatron-related is imported inside the functions: the harness pickles these functions
by name, and importing megatron in the pytest process is not needed.

Processes are expensive (~5 s of megatron import each), so each harness call runs every case of
one world size, tearing megatron's parallel state down between layouts:

- ``world1``: the seeded reference model (saved once as a dist checkpoint ``init`` that every
  layout loads), the fixed batch, the (1,1,1) references, micro-batch invariance, the NaN guard,
  save/load/continue and the atomicity checks;
- ``world2`` / ``world4``: the other layouts; ``world4`` finally loads every layout's updated
  checkpoint at TP1PP1 (DP4) and returns full weights, so updates compare tensor by tensor.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Dict, List, Tuple

import torch

TINY_HF = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "num_hidden_layers": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}
SEED = 1234
TEMPERATURE = 1.0
# (name, tp, pp, vpp, loss_agg_mode); dp = world / (tp * pp)
WORLD2_LAYOUTS = [
    ("tp2", 2, 1, 1, "token-mean"),
    ("pp2", 1, 2, 1, "token-mean"),
    ("dp2", 1, 1, 1, "token-mean"),
    ("pp2vpp2", 1, 2, 2, "token-mean"),
    ("dp2_seq", 1, 1, 1, "seq-mean-token-mean"),
    ("dp2_distopt", 1, 1, 1, "token-mean"),  # the distributed optimizer (state sharded over DP)
]
WORLD4_LAYOUTS = [
    ("tp2pp2", 2, 2, 1, "token-mean"),
    ("pp4vpp2", 1, 4, 2, "token-mean"),
    ("tp2pp2_seq", 2, 2, 1, "seq-mean-token-mean"),
]


# ----------------------------------------------------------------------------- configs and data
def sub_configs(mode: str = "token-mean", **train_over):
    """(model_cfg, optim_cfg, train_cfg, algo_cfg) of the tests.

    ``adam_eps=1`` makes one Adam update ``lr * g / (|g| + 1)``, ~``lr * g`` for small grads, so the
    updated weights depend on the gradient's scale (with the usual eps an update is
    ~``lr * sign(g)`` and would hide a wrong loss scale). ``lr=1`` makes the update large against
    float32 rounding of the weights; no clipping, so the update is the raw gradient's.
    The seq-mean variant also turns on the entropy bonus, so its gradient crosses TP too.
    """
    from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig

    model = ModelConfig(params_dtype="float32", transformer_impl="local", seed=SEED)
    optim = OptimConfig(lr=1.0, lr_warmup_steps=0, weight_decay=0.0, adam_eps=1.0, clip_grad=0.0)
    train = TrainConfig(**{"ppo_mini_batch_size": 4, "micro_batch_size": 2, **train_over})
    algo = AlgoConfig(loss_agg_mode=mode, entropy_coeff=0.01 if mode != "token-mean" else 0.0)
    return model, optim, train, algo


def make_actor(
    topology, mode: str = "token-mean", *, optim=None, total_steps: int = 4, distributed_optimizer=False, **train_over
):
    """Initialise megatron's parallel state for ``topology`` and build an actor on it."""
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_model_parallel

    init_model_parallel(topology, seed=SEED)
    model, optim_default, train, algo = sub_configs(mode, **train_over)
    return MegatronActor(
        model_spec_from_hf(TINY_HF),
        topology,
        model_cfg=model,
        optim_cfg=optim or optim_default,
        train_cfg=train,
        algo_cfg=algo,
        max_response_len=24,
        total_steps=total_steps,
        prompts_per_step=4,
        group_size=2,
        use_distributed_optimizer=distributed_optimizer,
    )


def start() -> None:
    """Create this rank's process group (gloo + the CPU compat layer on CPU, NCCL on CUDA).

    The harness starts ranks as *daemonic* processes, and dist_checkpointing's torch_dist writer
    starts helper processes (a spawn Manager and forked writers), which Python forbids a daemon.
    A real launcher (torchrun, srun) does not make daemons, so we lift the flag for this test rank.
    """
    import multiprocessing

    from dapo_megatron.parallel.init import init_distributed

    multiprocessing.current_process()._config["daemon"] = False
    init_distributed()


def finish() -> None:
    """Shut down the process group and dist_checkpointing's Manager process (no orphan survives a kill)."""
    from dapo_megatron.parallel.init import shutdown

    shutdown()


def teardown() -> None:
    """Destroy megatron's model-parallel groups (the default process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def make_batch(seed: int = 7, B: int = 8, T: int = 24, vocab: int = 96):
    """A fixed batch: 4 groups x 2 responses, prompts of 3-6 tokens, responses of 4+ tokens."""
    from dapo_megatron.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    rollout = torch.zeros((B, T))
    for b in range(B):
        p = int(torch.randint(3, 7, (1,), generator=g))
        r = int(torch.randint(4, T - p + 1, (1,), generator=g))
        tokens[b, : p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        mask[b, p : p + r] = 1.0
        rollout[b, p : p + r] = -torch.rand(r, generator=g) * 3
    adv_rows = torch.tensor([1.0, -1.0, 0.7, -0.7, -1.2, 0.8, 0.5, -0.5])[:B]
    return TrainBatch(
        tokens=tokens,
        loss_mask=mask,
        advantages=adv_rows[:, None] * mask,
        rollout_logprobs=rollout,
        seq_group=torch.arange(B) // 2,
    )


def with_old_logprobs(batch, logprobs: torch.Tensor, seed: int = 11):
    """``batch`` with old log-probs = current ones + noise in [-0.4, 0.4] on response tokens."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(logprobs.shape, generator=g) - 0.5) * 0.8
    return replace(batch, old_logprobs=torch.where(batch.loss_mask != 0, logprobs + noise, torch.zeros_like(logprobs)))


def full_weights(actor) -> Dict[str, torch.Tensor]:
    """Float tensors of the single chunk's state dict (meaningful at TP1PP1 only)."""
    (chunk,) = actor.model_chunks
    return {
        k: v.detach().clone() for k, v in chunk.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
    }


def _path(tmp: str, name: str) -> str:
    return os.path.join(tmp, "ckpt", name)


# ----------------------------------------------------------------------------- world size 1
def _world1_body(rank: int, world: int, tmp: str) -> dict:
    """References at (1,1,1) plus every single-process check. Returns tensors and metrics."""
    from dapo_megatron.megatron.checkpoint import save_checkpoint
    from dapo_megatron.parallel.topology import Topology

    topo = Topology(world_size=1, tp=1, pp=1, vpp=1, cp=1, ep=1)
    os.makedirs(os.path.join(tmp, "ckpt"), exist_ok=True)
    out: dict = {}
    actor = make_actor(topo)
    save_checkpoint(actor, _path(tmp, "init"), step=0, extra_state={})
    out["w_init"] = full_weights(actor)
    batch = make_batch()
    out["lp_init"] = actor.compute_logprobs(batch, temperature=TEMPERATURE)
    mask = batch.loss_mask != 0
    out["sft_expected"] = float(-out["lp_init"][mask].sum() / mask.sum())
    out["sft"] = actor.sft_step(batch.tokens, batch.loss_mask)  # the supervised warm-up path
    out["w_after_sft"] = full_weights(actor)
    batch = with_old_logprobs(batch, out["lp_init"])
    out["batch"] = batch
    teardown()
    for mode, suffix in (("token-mean", ""), ("seq-mean-token-mean", "_seq")):
        actor = _loaded_actor(topo, tmp, mode)
        out[f"metrics{suffix}"] = actor.train_step(batch, temperature=TEMPERATURE)
        out[f"w_after{suffix}"] = full_weights(actor)
        save_checkpoint(actor, _path(tmp, f"after_ref{suffix}"), step=1, extra_state={})
        teardown()
    out["microbatch"] = _microbatch_case(topo, tmp, batch)
    out["nan_guard"] = _nan_guard_case(topo, tmp, batch)
    out["resume"] = _resume_case(topo, tmp, batch)
    out["atomic"] = _atomic_case(topo, tmp)
    return out


def _loaded_actor(topo, tmp: str, mode: str = "token-mean", **kw):
    from dapo_megatron.megatron.checkpoint import load_checkpoint

    actor = make_actor(topo, mode, **kw)
    load_checkpoint(actor, _path(tmp, "init"), model_only=True)
    return actor


def _microbatch_case(topo, tmp: str, batch) -> dict:
    """The same update with 1 micro-batch of 8 rows, 4 of 2 rows, and token-budget micro-batches."""
    res = {}
    for name, kw in (("mb1", {"micro_batch_size": 8}), ("mb4", {"micro_batch_size": 2}),
                     ("tokens", {"max_tokens_per_microbatch": 40})):  # fmt: skip
        actor = _loaded_actor(topo, tmp, **kw)
        res[name] = {"metrics": actor.train_step(batch, temperature=TEMPERATURE), "w": full_weights(actor)}
        teardown()
    return res


def _nan_guard_case(topo, tmp: str, batch) -> dict:
    """An inf advantage skips the update; the next good update equals the reference update."""
    bad_adv = batch.advantages.clone()
    row, col = 0, int(torch.nonzero(batch.loss_mask[0])[0])
    bad_adv[row, col] = float("inf")
    actor = _loaded_actor(topo, tmp)
    before = full_weights(actor)
    bad = actor.train_step(replace(batch, advantages=bad_adv), temperature=TEMPERATURE)
    after_bad = full_weights(actor)
    good = actor.train_step(batch, temperature=TEMPERATURE)
    res = {"bad": bad, "good": good, "before": before, "after_bad": after_bad, "after_good": full_weights(actor)}
    teardown()
    return res


def _resume_case(topo, tmp: str, batch) -> dict:
    """3 steps straight vs. 1 step, save, load into a fresh actor, 2 more steps (lr warm-up on)."""
    from dapo_megatron.config import OptimConfig
    from dapo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint

    optim = OptimConfig(lr=0.05, lr_warmup_steps=2, lr_decay_style="cosine", weight_decay=0.1, adam_eps=1e-8)
    actor = _loaded_actor(topo, tmp, optim=optim)
    first = actor.train_step(batch, temperature=TEMPERATURE)
    path = _path(tmp, "resume")
    save_checkpoint(actor, path, step=1, extra_state={"sampler": [1, 2, 3]})
    straight = [actor.train_step(batch, temperature=TEMPERATURE) for _ in range(2)]
    w_straight = full_weights(actor)
    teardown()
    actor = make_actor(topo, optim=optim)
    step, extra = load_checkpoint(actor, path)
    resumed = [actor.train_step(batch, temperature=TEMPERATURE) for _ in range(2)]
    res = {"first": first, "straight": straight, "resumed": resumed, "step": step, "extra": extra,
           "w_straight": w_straight, "w_resumed": full_weights(actor), "rng_restored": actor.rng_restored}  # fmt: skip
    teardown()
    return res


def _atomic_case(topo, tmp: str) -> dict:
    """Crash while publishing: before the rename, and between moving the old copy aside and the rename."""
    import dapo_megatron.megatron.checkpoint as ck

    root = os.path.join(tmp, "atomic")
    os.makedirs(root)
    path = os.path.join(root, "step_1")
    actor = _loaded_actor(topo, tmp)
    ck.save_checkpoint(actor, path, step=1, extra_state={"tag": "first"})
    res: dict = {}
    original_fsync = ck._fsync_tree

    def crash_fsync(folder):
        raise RuntimeError("injected crash after writing the tmp folder")

    ck._fsync_tree = crash_fsync
    try:
        ck.save_checkpoint(actor, path, step=2, extra_state={"tag": "second"})
    except RuntimeError as e:
        res["crash1"] = str(e)
    finally:
        ck._fsync_tree = original_fsync
    res["after_crash1"] = {"listing": sorted(os.listdir(root)), "latest": ck.latest_checkpoint(root),
                           "loaded": ck.load_checkpoint(actor, path)}  # fmt: skip
    original_replace = os.replace

    def crash_second_replace(src, dst):
        if ".tmp-" in os.path.basename(src) and os.path.isdir(src):
            raise RuntimeError("injected crash between the renames")
        return original_replace(src, dst)

    os.replace = crash_second_replace
    try:
        ck.save_checkpoint(actor, path, step=3, extra_state={"tag": "third"})
    except RuntimeError as e:
        res["crash2"] = str(e)
    finally:
        os.replace = original_replace
    latest = ck.latest_checkpoint(root)
    res["after_crash2"] = {"listing": sorted(os.listdir(root)), "latest": latest, "path_exists": os.path.exists(path),
                           "loaded": ck.load_checkpoint(actor, latest) if latest else None}  # fmt: skip
    ck.save_checkpoint(actor, path, step=4, extra_state={"tag": "fourth"})
    res["after_recovery"] = {"latest": ck.latest_checkpoint(root), "loaded": ck.load_checkpoint(actor, path),
                             "listing": sorted(os.listdir(root))}  # fmt: skip
    teardown()
    return res


# ----------------------------------------------------------------------------- world sizes 2 and 4
def run_layouts(rank: int, world: int, tmp: str, batch, layouts: List[Tuple]) -> dict:
    """For each layout: load ``init``, compute log-probs, one ``train_step``, save ``after_<name>``."""
    from dapo_megatron.megatron.checkpoint import save_checkpoint
    from dapo_megatron.parallel.topology import Topology

    out = {}
    for name, tp, pp, vpp, mode in layouts:
        topo = Topology(world_size=world, tp=tp, pp=pp, vpp=vpp, cp=1, ep=1)
        actor = _loaded_actor(topo, tmp, mode, distributed_optimizer=name.endswith("_distopt"))
        lp = actor.compute_logprobs(batch, temperature=TEMPERATURE)
        metrics = actor.train_step(batch, temperature=TEMPERATURE)
        save_checkpoint(actor, _path(tmp, f"after_{name}"), step=1, extra_state={})
        out[name] = {"metrics": metrics, "lp": lp, "lp_after": actor.compute_logprobs(batch, temperature=TEMPERATURE)}
        teardown()
    return out


def _world2_body(rank: int, world: int, tmp: str, batch) -> dict:
    """World-2 layouts, then the reshard check: the TP2PP1 checkpoint loaded at TP1PP2."""
    from dapo_megatron.megatron.checkpoint import load_checkpoint
    from dapo_megatron.parallel.topology import Topology
    from tests.dispatch_reference import broadcast_batch

    out = run_layouts(rank, world, tmp, batch, WORLD2_LAYOUTS)
    out["broadcast"], _ = broadcast_batch(batch if rank == 0 else None, src=0)
    actor = make_actor(Topology(world_size=2, tp=1, pp=2, vpp=1, cp=1, ep=1))
    load_checkpoint(actor, _path(tmp, "after_tp2"))
    out["reshard_lp"] = actor.compute_logprobs(batch, temperature=TEMPERATURE)
    teardown()
    return out


def _world4_body(rank: int, world: int, tmp: str, batch, names: List[str]) -> dict:
    """World-4 layouts, then every ``after_<name>`` loaded at TP1PP1 x DP4: full weights per name."""
    from dapo_megatron.megatron.checkpoint import load_checkpoint
    from dapo_megatron.parallel.topology import Topology

    out = run_layouts(rank, world, tmp, batch, WORLD4_LAYOUTS)
    weights = {}
    for name in names + [n for n, *_ in WORLD4_LAYOUTS]:
        actor = make_actor(Topology(world_size=4, tp=1, pp=1, vpp=1, cp=1, ep=1))
        load_checkpoint(actor, _path(tmp, f"after_{name}"), model_only=True)
        weights[name] = full_weights(actor) if rank == 0 else None
        teardown()
    out["weights"] = weights
    return out


# ----------------------------------------------------------------------------- comparisons
def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-30)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


def weights_rel_diff(w: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]) -> tuple:
    """(max relative diff of the weights per tensor, relative diff of the update ``w - init``).

    The update's diff is ``max |dw - dw_ref|`` over all elements divided by ``max |dw_ref|`` over all
    elements: per tensor it would be limited by float32 rounding of weights near 1 (norm weights)
    whose update is tiny, and say nothing about the update.
    """
    assert w.keys() == ref.keys(), sorted(set(w) ^ set(ref))
    weights = max(rel_diff(w[k], ref[k]) for k in ref)
    err = max(float(((w[k] - init[k]).double() - (ref[k] - init[k]).double()).abs().max()) for k in ref)
    scale = max(float((ref[k] - init[k]).double().abs().max()) for k in ref)
    return weights, err / max(scale, 1e-30)


def scalar_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def world1(rank: int, world: int, tmp: str) -> dict:
    """Rank function (harness): start the process group, run ``_world1_body``, shut down."""
    start()
    try:
        return _world1_body(rank, world, tmp)
    finally:
        finish()


def world2(rank: int, world: int, tmp: str, batch) -> dict:
    """Rank function (harness): start the process group, run ``_world2_body``, shut down."""
    start()
    try:
        return _world2_body(rank, world, tmp, batch)
    finally:
        finish()


def world4(rank: int, world: int, tmp: str, batch, names: List[str]) -> dict:
    """Rank function (harness): start the process group, run ``_world4_body``, shut down."""
    start()
    try:
        return _world4_body(rank, world, tmp, batch, names)
    finally:
        finish()


# ----------------------------------------------------------------------------- CUDA (one GPU)
def gpu_case(rank: int, world: int, tmp: str) -> dict:
    """On CUDA + NCCL at (1,1,1): the same update with 1 and 4 micro-batches, plus CPU-side references.

    Returns both updates' metrics and weights, the initial weights and the batch.
    """
    start()
    try:
        from dapo_megatron.megatron.checkpoint import save_checkpoint
        from dapo_megatron.parallel.topology import Topology

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        topo = Topology(world_size=1)
        os.makedirs(os.path.join(tmp, "ckpt"), exist_ok=True)
        actor = make_actor(topo)
        save_checkpoint(actor, _path(tmp, "init"), step=0, extra_state={})
        out = {"w_init": {k: v.cpu() for k, v in full_weights(actor).items()}}
        batch = make_batch()
        batch = with_old_logprobs(batch, actor.compute_logprobs(batch, temperature=TEMPERATURE))
        out["batch"] = batch
        teardown()
        for name, mbs in (("mb1", 8), ("mb4", 2)):
            actor = _loaded_actor(topo, tmp, micro_batch_size=mbs)
            metrics = actor.train_step(batch, temperature=TEMPERATURE)
            out[name] = {"metrics": metrics, "w": {k: v.cpu() for k, v in full_weights(actor).items()}}
            teardown()
        return out
    finally:
        finish()


# ----------------------------------------------------------------------------- one run per pytest session
_SUITE: dict = {}
REPORT: Dict[str, str] = {}


def suite(stage: str) -> dict:
    """Results of ``world1`` / ``world2`` / ``world4`` (rank 0's), each run once per session.

    The stages share one temporary folder: world 2 and 4 load ``init`` and the batch of world 1,
    and world 4 reloads the checkpoints the others saved.
    """
    import atexit
    import shutil
    import tempfile

    from tests.distributed_harness import run_distributed

    if "tmp" not in _SUITE:
        _SUITE["tmp"] = tempfile.mkdtemp(prefix="actor_suite_")
        atexit.register(shutil.rmtree, _SUITE["tmp"], True)
    tmp = _SUITE["tmp"]
    if stage not in _SUITE:
        if stage == "world1":
            _SUITE[stage] = run_distributed(world1, 1, tmp, timeout_s=600)
        elif stage == "world2":
            _SUITE[stage] = run_distributed(world2, 2, tmp, suite("world1")[0]["batch"], timeout_s=600)
        else:
            suite("world2")
            names = ["ref", "ref_seq"] + [n for n, *_ in WORLD2_LAYOUTS]
            _SUITE[stage] = run_distributed(world4, 4, tmp, suite("world1")[0]["batch"], names, timeout_s=600)
    return _SUITE[stage]


def report(name: str, text: str) -> None:
    """Record and print a measured tolerance (shown with ``pytest -s``; collected for the issue note)."""
    REPORT[name] = text
    print(f"\n[measured] {name}: {text}")

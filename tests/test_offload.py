"""Colocated mode's trainer offload: params, grads and Adam state leave the device and come back bit
for bit (real megatron-core actor, DDP buffers, plain and distributed optimizer, fp32 and bf16)."""

import pytest
import torch

from dapo_megatron.observability import memory_plan as mp
from tests.distributed_harness import run_distributed
from tests.offload_cases import gpu_offload_case, offload_case


def _check_layout(name: str, r: dict, dp: int) -> None:
    dtype, kind = name.split("/")
    assert r["params_kept_for_sync"], f"{name}: the first offload took parameters the weight sync still reads"
    assert r["opt_grads_freed"] and r["all_freed"], f"{name}: a storage kept its device bytes while offloaded"
    assert "offloaded to host memory" in r["refused_while_offloaded"], r["refused_while_offloaded"]
    expect = r["expect"]
    assert r["first"] == expect["opt"] + expect["grads"] and r["second"] == expect["params"], (name, r)
    assert r["held"] == r["first"] + r["second"] == r["reloaded"]
    assert r["state_bitwise"], f"{name}: params or Adam state changed across offload + reload"
    assert r["losses"] == r["plain_losses"] and r["final_bitwise"], f"{name}: offload changed the training"
    # The bytes freed are the memory plan's trainer state (memory_plan.state_bytes_per_param), up to
    # megatron's buffer padding and torch Adam's per-tensor step counters (above), and the norm
    # weights a bf16 model keeps in fp32 (2 B less each: no separate fp32 main copy; below).
    p, g, o = mp.state_bytes_per_param("fp32" if dtype == "float32" else "bf16")
    planned = r["numel"] * (p + g + o / (dp if kind == "distopt" else 1))
    assert 0.995 * planned <= r["held"] <= planned * 1.06 + 4096, (name, r["held"], planned)


def test_offload_round_trip_is_bitwise_at_one_rank():
    (r,) = run_distributed(offload_case, 1, "", [("float32", False), ("bfloat16", False)], timeout_s=600)
    for name, res in r.items():
        print(f"{name}: {res['held']} bytes offloaded for {res['numel']} params")
        _check_layout(name, res, dp=1)


def test_offload_round_trip_is_bitwise_with_the_distributed_optimizer_at_two_ranks():
    out = run_distributed(offload_case, 2, "", [("float32", True), ("bfloat16", True)], timeout_s=600)
    for r in out:
        for name, res in r.items():
            print(f"{name} (DP2 rank): {res['held']} bytes offloaded for {res['numel']} params")
            _check_layout(name, res, dp=2)


# ----------------------------------------------------------------------------- the real loop
_NOT_COMPARED = ("time/", "memory/", "gpu/")  # wall times and the offload's own bookkeeping


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(_NOT_COMPARED) and "time" not in k and "per_s" not in k}
            for r in rows]  # fmt: skip


def test_colocated_run_with_offload_is_bitwise_identical_to_one_without(tmp_path):
    """`dapo-megatron train`, colocated embedded engine, 3 steps with a checkpoint at step 2 (the save
    reloads the trainer mid-run, then syncs the engines again) and at step 3, eval at 2 and 3: every
    logged metric, and the exported weights, are identical with and without the offload."""
    from safetensors.torch import load_file

    from dapo_megatron.observability.sinks import read_metrics
    from tests.cli_runs import TINY, run_cli, write_demo_assets

    assets = write_demo_assets(tmp_path / "assets")
    runs = {}
    for offload in ("true", "false"):
        run = tmp_path / f"offload_{offload}"
        run_cli(assets, "train", "--config", TINY, f"run.dir={run}", "rollout.mode=colocated",
                f"rollout.offload_trainer={offload}", "train.total_steps=3", "run.save_every=2", "run.eval_every=2",
                timeout=900)  # fmt: skip
        out = tmp_path / f"export_{offload}"
        run_cli(assets, "export", "--ckpt", str(run / "checkpoints" / "step_000003"), "--hf-dir",
                str(assets / "model"), "--out", str(out), "--dtype", "float32", "--no-progress")  # fmt: skip
        runs[offload] = (read_metrics(str(run)), load_file(str(next(out.glob("*.safetensors")))))
    (m_on, w_on), (m_off, w_off) = runs["true"], runs["false"]
    trained = [r for r in m_on if r["step"] > 0]
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["memory/trainer_offloaded_gib"] > 0 for r in trained), "the offload did not run"
    assert all(r["memory/trainer_reload_s"] >= 0 for r in trained)
    assert not any(k.startswith("memory/trainer") for r in m_off for k in r), "offload_trainer=false offloaded"
    assert _comparable(m_on) == _comparable(m_off)
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_releases_cuda_memory():
    """On a GPU: each offload phase lowers memory_allocated by the bytes it reports (and empty_cache
    lowers memory_reserved with it); reload brings allocated back; the CPU cases' bitwise checks hold."""
    (r,) = run_distributed(gpu_offload_case, 1, "", timeout_s=600)
    _check_layout("bfloat16/plain", r["bitwise"], dp=1)
    (_, a0, r0, _, _), (_, a1, r1, t1, m1), (_, a2, r2, t2, m2), (_, a3, _, t3, m3) = r["memory"]
    print(f"cuda offload: opt+grads {m1} B in {t1:.4f} s, params {m2} B in {t2:.4f} s, reload {m3} B in {t3:.4f} s")
    assert m1 > 0 and m2 > 0 and m3 == m1 + m2
    assert a0 - a1 >= 0.99 * m1 and a1 - a2 >= 0.99 * m2, r["memory"]  # allocator blocks round up (512 B)
    assert r2 <= r0 - 0.99 * (m1 + m2), r["memory"]  # empty_cache gave the blocks back to the driver
    assert abs(a3 - a0) <= 0.01 * (m1 + m2) + (1 << 20), r["memory"]


def test_two_rank_distributed_optimizer_run_with_offload_is_bitwise_identical(tmp_path):
    """The same comparison at DP2 with the distributed optimizer (its fp32 shards and Adam state split
    over the ranks), launched by torchrun: the barriers of the sync and of the mid-run save hold."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from dapo_megatron.observability.sinks import read_metrics
    from tests.cli_runs import TINY, cli_env, run_cli, write_demo_assets
    from tests.distributed_harness import free_port

    assets = write_demo_assets(tmp_path / "assets")
    runs = {}
    for offload in ("true", "false"):
        run = tmp_path / f"offload_{offload}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "dapo_megatron", "train", "--config", TINY, f"run.dir={run}", "rollout.mode=colocated",
               "parallel.use_distributed_optimizer=true", f"rollout.offload_trainer={offload}",
               "train.total_steps=3", "run.save_every=2", "run.eval_every=0"]  # fmt: skip
        env = cli_env(assets)
        env.pop("MASTER_PORT", None)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        out = tmp_path / f"export_{offload}"
        run_cli(assets, "export", "--ckpt", str(run / "checkpoints" / "step_000003"), "--hf-dir",
                str(assets / "model"), "--out", str(out), "--dtype", "float32", "--no-progress")  # fmt: skip
        runs[offload] = (read_metrics(str(run)), load_file(str(next(out.glob("*.safetensors")))))
    (m_on, w_on), (m_off, w_off) = runs["true"], runs["false"]
    assert [r["step"] for r in m_on] == [1, 2, 3]
    assert all(r["memory/trainer_offloaded_gib"] > 0 for r in m_on), "the offload did not run"
    assert _comparable(m_on) == _comparable(m_off)
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)

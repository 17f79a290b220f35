"""The sbatch scripts without a cluster: syntax, headers a user edits, launch rules, engine launcher."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.config import ParallelConfig, RolloutConfig
from dapo_megatron.controller.placement import plan_placement, save_placement

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SBATCH = ["single_node_colocated.sbatch", "multi_node_colocated.sbatch", "disaggregated.sbatch", "local_tiny.sbatch"]


@pytest.mark.parametrize("name", SBATCH + ["common.sh", "engines_on_node.sh"])
def test_scripts_parse_and_never_kill_by_name(name):
    path = SLURM_DIR / name
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert not re.search(r"\b(pkill|killall)\b", text)
    assert "/work/" not in text and "/home/" not in text  # no machine paths


@pytest.mark.parametrize("name", SBATCH)
def test_sbatch_headers_and_srun_launch(name):
    text = (SLURM_DIR / name).read_text().replace("\\\n", " ")  # join continued lines
    headers = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    assert {"job-name", "time", "output"} <= set(headers)
    assert "slurm/common.sh" in text
    assert re.search(r"^srun .*--kill-on-bad-exit=1", text, flags=re.M)
    if name == "local_tiny.sbatch":
        assert headers["ntasks"] == "2" and headers["cpus-per-task"] == "1"
        assert "dapo-megatron train --config examples/tiny_cpu.yaml" in text
    else:
        assert {"nodes", "gpus-per-node", "ntasks-per-node"} <= set(headers)
        assert 'dapo-megatron train --config "$CONFIG"' in text and "dapo-megatron plan" in text
    if name == "disaggregated.sbatch":
        assert "--relative=0" in text and "dapo_start_engines" in text and "--het" in text  # choice documented


def test_engines_on_node_starts_the_planned_slots():
    """The servers `dapo-megatron engines` starts on a node: the plan's ports, TP and GPUs, bound to the
    node's address (never 0.0.0.0), with the job's key, from the one launcher the trainer also uses."""
    from dapo_megatron.config import Config
    from dapo_megatron.controller.engine_node import node_server_options
    from dapo_megatron.rollout.sglang_server import launch_sglang_server

    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=3, engine_tensor_parallel=2)
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}
    plan = plan_placement(env, rollout, ParallelConfig())
    cfg = Config(rollout=dataclasses.replace(rollout, sglang_device="cuda", mem_fraction_static=0.8))
    options = node_server_options(cfg, plan, "n2", "job-key", resolve={"n2": "10.0.0.2"}.__getitem__)
    assert [(o.port, o.tp, o.gpu_ids) for o in options] == [(30010, 2, (0, 1)), (30018, 2, (2, 3)), (30026, 2, (4, 5))]
    argv = launch_sglang_server(options[0])
    assert argv[argv.index("--host") + 1] == "10.0.0.2" and argv[argv.index("--api-key") + 1] == "job-key"
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.8" and argv[argv.index("--load-format") + 1] == "dummy"
    assert plan.router_host == "n2" and [e.url for e in plan.engines][0] == "http://n2:30010"
    assert node_server_options(cfg, plan, "n1", "job-key", resolve=lambda n: "10.0.0.1") == []


def test_engines_on_node_refuses_a_node_without_slots(tmp_path):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=1)
    save_placement(plan_placement(env, rollout, ParallelConfig()), str(tmp_path / "p.json"))
    proc = subprocess.run(
        [
            "bash",
            str(SLURM_DIR / "engines_on_node.sh"),
            str(tmp_path / "p.json"),
            str(REPO / "examples" / "tiny_cpu.yaml"),
        ],
        env={
            **os.environ,
            "SLURMD_NODENAME": "n1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # this venv's CLI
            "DEMO_ASSETS": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "puts nothing on n1" in proc.stderr, proc.stderr


def test_qwen3_moe_recipe_plans_on_four_h800_nodes(tmp_path, monkeypatch, capsys):
    """examples/dapo_qwen3_30b_a3b.yaml as slurm/disaggregated.sbatch runs its first command on 4 nodes of
    8 GPUs with ENGINE_NODES=2: 16 trainer ranks, 8 engines of TP 2 on the last two nodes, and the memory
    plan (shape from the preset: no model folder here) fits 80 GiB GPUs (--require-fit)."""
    from dapo_megatron.cli import main

    for name in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE"))]:
        monkeypatch.delenv(name)
    env = {"MODELS": "/models", "CKPT": "/ckpt", "DATA": "/data", "SLURM_JOB_NODELIST": "n[1-4]"}
    env.update({"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["plan", "--config", str(REPO / "examples" / "dapo_qwen3_30b_a3b.yaml"), "rollout.mode=disaggregated",
            "--engine-nodes", "2", "--model-preset", "qwen3-30b-a3b", "--require-fit"]  # fmt: skip
    assert main([*argv, "--json", str(tmp_path / "placement.json")]) == 0
    out = capsys.readouterr().out
    assert "trainer: 2 node(s) x 8 rank(s) = 16 ranks" in out and "engines: 8" in out
    assert "n4    engine   -              :30010[0,1] :30018[2,3] :30026[4,5] :30034[6,7]" in out
    assert "TP2 PP1 DP8 CP1 VPP1 = 16 GPUs, EP8 ETP2 (expert DP 1)" in out and "verdict FITS" in out
    assert main([*argv, "--gpu-mem-gib", "40"]) == 1  # the same plan on 40 GiB GPUs: exit 1, and says so
    assert "verdict DOES NOT FIT" in capsys.readouterr().out

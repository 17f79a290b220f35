"""The sbatch scripts without a cluster: syntax, headers a user edits, launch rules, engine launcher."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from dapo_megatron.config import ParallelConfig, RolloutConfig
from dapo_megatron.controller.placement import plan_placement, save_placement

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
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


def test_engines_on_node_starts_the_planned_slots(tmp_path):
    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=3, engine_tensor_parallel=2)
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}
    plan_path = tmp_path / "placement.json"
    save_placement(plan_placement(env, rollout, ParallelConfig()), str(plan_path))
    out = tmp_path / "out"
    out.mkdir()
    # Engines record their slot and PID, then serve (sleep). The router waits for all three and exits,
    # which ends the launcher; it must then stop the engines it started.
    engine_cmd = f'echo "$ENGINE_TP $CUDA_VISIBLE_DEVICES $$" > {out}/engine-$ENGINE_PORT; exec sleep 60'
    router_cmd = (
        f"for i in $(seq 100); do [ $(ls {out} | wc -l) -ge 3 ] && break; sleep 0.1; done; "
        f'echo "$ROUTER_PORT $WORKER_URLS" > {out}/router'
    )
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "engines_on_node.sh"), str(plan_path)],
        env={**os.environ, "SLURMD_NODENAME": "n2", "ENGINE_CMD": engine_cmd, "ROUTER_CMD": router_cmd},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    engines = {p.name: p.read_text().split() for p in out.glob("engine-*")}
    assert sorted(engines) == ["engine-30010", "engine-30018", "engine-30026"]
    assert [engines[k][:2] for k in sorted(engines)] == [["2", "0,1"], ["2", "2,3"], ["2", "4,5"]]
    urls = "http://n2:30010 http://n2:30018 http://n2:30026"
    assert (out / "router").read_text().strip() == f"30000 {urls}"
    for _, _, pid in engines.values():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.1)
        assert not _alive(int(pid)), f"engine PID {pid} outlived its launcher"
    json.loads(plan_path.read_text())  # the plan stays valid JSON for the trainer


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the launcher's bash, is gone; init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_engines_on_node_refuses_a_node_without_slots(tmp_path):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=1)
    save_placement(plan_placement(env, rollout, ParallelConfig()), str(tmp_path / "p.json"))
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "engines_on_node.sh"), str(tmp_path / "p.json")],
        env={**os.environ, "SLURMD_NODENAME": "n1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "puts nothing on n1" in proc.stderr

"""Real multi-node SLURM: three nodes, each a network namespace with its own address and slurmd, one
slurmctld (tests/slurm_netns.py). The shipped sbatch scripts run as a user submits them, with real SGLang
CPU servers (marker ``sglang``): slurm/disaggregated.sbatch trains on two nodes (DP2, one rank per node)
against an engine on the third, and slurm/multi_node_colocated.sbatch trains at TP2 or PP2 across two nodes
with an engine on each, fed by the trainer rank on its own node. Node names resolve only inside the
namespaces, so every rendezvous, engine request and weight broadcast went between namespaces over the
bridge.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmJobError
from slurm_netns import NetnsRefused, NetnsSlurm, netns_cluster  # noqa: F401  (module fixture)
from test_slurm import GAP_BOUND, _job_env, _pids_with, _tail

from dapo_megatron.observability.sinks import read_metrics
from tests.sglang_real import SGLANG_PYTHON, needs_sglang
from tests.test_weight_sync_stages import _stage_bytes

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
STEPS = 3
# One task and one CPU per node, no GPU: command-line options win over the scripts' #SBATCH lines.
CPU_NODE = ["--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    cmd = [sys.executable, "-m", "dapo_megatron", "demo", "--assets-only", str(out), "--config", TINY]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def _overrides(*extra):
    return [
        "rollout.engine=sglang", f"rollout.sglang_python={SGLANG_PYTHON}", f"train.total_steps={STEPS}",
        "run.eval_every=0", "run.save_every=0", "rollout.server_start_timeout_s=600", *extra,
    ]  # fmt: skip


def _report(tmp_path, run_dir, cluster, job_output=True):
    """The job output (unless a SlurmJobError holds it), the run's logs and the slurmd logs."""
    logs = run_dir / "logs"
    parts = [_tail(p, 6000) for p in sorted(tmp_path.glob("dapo-*.out"))] if job_output else []
    for pattern in ("engines-*.log", "sglang-*.log", "router-*.log", "trainer-*.log"):
        parts += [_tail(p) for p in sorted(logs.glob(pattern))]
    return "\n".join(parts) + "\n" + cluster.logs_tail(20)


def _submit(cluster, script, *, options, overrides, env, tmp_path, run_dir):
    """sbatch the repo's script and wait; fail with the job's output and every log on any other end."""
    key_file = run_dir / "engine_api_key"
    try:
        try:
            job_id, _ = cluster.submit_and_wait(str(REPO / "slurm" / script), options=options, args=overrides,
                                                env=env, timeout_s=1200, cwd=str(tmp_path))  # fmt: skip
        except SlurmJobError as e:
            pytest.fail(f"{e}\n{_report(tmp_path, run_dir, cluster, job_output=False)}", pytrace=False)
        return job_id
    finally:
        if key_file.is_file() and key_file.read_text().strip():  # never leave a server behind
            for pid in _pids_with(key_file.read_text().strip()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _slurmd_launches(cluster, node, job_id):
    """(step, requesting host) of every task launch of ``job_id`` that ``node``'s slurmd logged."""
    text = Path(cluster.root, "log", f"slurmd-{node}.out").read_text(errors="replace")
    return re.findall(rf"launch task StepId={job_id}\.(\d+) request from .*? HOST:([\d.]+)", text)


def _check_steps(run_dir, report):
    """Every step trained, synced and sampled with the previous step's weights at a small gap."""
    steps = [r for r in read_metrics(str(run_dir)) if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), report()
    for r in steps:
        assert r["sync/weight_version"] == r["step"], (r, report())
        assert r["rollout/stale_samples"] == 0, (r, report())
        assert r["rollout/logprob_gap_mean"] <= GAP_BOUND, (r, report())
    assert "weight check (first step)" in (run_dir / "logs" / "trainer-0.log").read_text(), report()
    return [f"{r['rollout/logprob_gap_mean']:.1e}" for r in steps]


def _check_names_stay_inside(cluster):
    """Node names resolve to namespace addresses inside the cluster and to nothing outside it."""
    for node in cluster.nodes:
        got = cluster.in_node("node1", ["getent", "hosts", node]).stdout.split()
        assert got[:1] == [cluster.address(node)], (node, got)
        with pytest.raises(OSError):
            socket.gethostbyname(node)  # the root namespace cannot reach a node by name


def _run_job(cluster, assets, tmp_path, script, *, nodes, port, extra, **env_extra):
    """sbatch ``slurm/<script>`` on ``nodes`` CPU namespace nodes with the tiny SGLang config plus
    ``extra`` overrides and rendezvous ``port``. Returns ``(run_dir, job_id, plan, report)``:
    ``plan`` is the saved placement, ``report()`` the job's output and logs for assertion messages."""
    run_dir = tmp_path / "run"
    env = _job_env(tmp_path, RUN_DIR=str(run_dir), MASTER_PORT=str(port), DEMO_ASSETS=str(assets), CONFIG=TINY,
                   **env_extra)  # fmt: skip
    job_id = _submit(cluster, script, options=[f"--nodes={nodes}", *CPU_NODE], overrides=_overrides(*extra),
                     env=env, tmp_path=tmp_path, run_dir=run_dir)  # fmt: skip
    plan = json.loads((run_dir / "placement.json").read_text())
    return run_dir, job_id, plan, lambda: _report(tmp_path, run_dir, cluster)


@needs_sglang
@pytest.mark.sglang  # real SGLang servers: tools/run_tests.sh runs these in its .venv-sglang pass
@pytest.mark.slow
@pytest.mark.timeout(1500)  # the job may take 1200 s (below) on a loaded 2-core machine
def test_disaggregated_sbatch_two_trainer_nodes_one_engine_node(netns_cluster, assets, tmp_path):  # noqa: F811
    """slurm/disaggregated.sbatch on 3 namespace nodes: trainer ranks 0 and 1 on node1 and node2 (DP2),
    one SGLang CPU server and the router on node3; weights go to node3 over the gloo update group at
    MASTER_ADDR=node1 every step."""
    cluster = netns_cluster
    run_dir, job_id, plan, report = _run_job(cluster, assets, tmp_path, "disaggregated.sbatch", nodes=3, port=29611,
                                             extra=("rollout.num_engines=1",), ENGINE_NODES="1")  # fmt: skip
    assert plan["trainer_nodes"] == ["node1", "node2"] and plan["trainer_world_size"] == 2, plan
    assert [(e["node"], e["gpu_ids"]) for e in plan["engines"]] == [("node3", [])], plan
    assert plan["master_addr"] == "node1" and plan["router_host"] == "node3", plan
    output = (tmp_path / f"dapo-disagg-{job_id}.out").read_text()
    assert "master node1:29611, net eth0" in output, output  # common.sh: rendezvous and interface
    # `dapo-megatron engines` on node3 bound the server and the router to node3's namespace address.
    node3 = cluster.address("node3")
    served = f"node3 serves ['http://{node3}:{plan['engines'][0]['port']}'] and the router http://{node3}:"
    assert served in (run_dir / "logs" / "engines-node3.log").read_text(), report()
    # Each slurmd launched its part, asked by the batch step on node1 at its namespace address.
    batch_host = cluster.address("node1")
    launched = {n: _slurmd_launches(cluster, n, job_id) for n in cluster.nodes}
    assert all(hosts and {h for _, h in hosts} == {batch_host} for hosts in launched.values()), launched
    engine_step = {s for s, _ in launched["node3"]}
    trainer_steps = {s for s, _ in launched["node1"]} & {s for s, _ in launched["node2"]}
    assert trainer_steps and not trainer_steps & engine_step, launched  # trainer step spans node1+node2 only
    gaps = _check_steps(run_dir, report)
    _check_names_stay_inside(cluster)
    print(f"multi-node disaggregated sbatch (DP2 on node1+node2, SGLang CPU on node3): gaps {gaps}")


# The two 2-node colocated layouts: TP2 (each rank's TP all-gather leaves it the whole model) and PP2
# (each rank gathers its stage and receives the other over the pipeline group, as at the 32B recipe).
LAYOUTS = {"tp2": ("parallel.tensor=2", 29612), "pp2": ("parallel.pipeline=2", 29613)}


@needs_sglang
@pytest.mark.sglang  # real SGLang servers: tools/run_tests.sh runs these in its .venv-sglang pass
@pytest.mark.slow
@pytest.mark.timeout(1500)  # the job may take 1200 s (below) on a loaded 2-core machine
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_multi_node_colocated_sbatch_on_two_nodes(netns_cluster, assets, tmp_path, layout):  # noqa: F811
    """slurm/multi_node_colocated.sbatch on 2 namespace nodes, one trainer rank on each (TP2 or PP2
    across node1 and node2), one SGLang CPU server on each node and the router on node1. Every step's
    weights reach both servers as shared tensors from the rank on the server's own node (per-node
    senders), the whole model to each; the nodes have separate /dev/shm, so a file shared to the other
    node would not open."""
    cluster = netns_cluster
    override, port = LAYOUTS[layout]
    run_dir, job_id, plan, report = _run_job(cluster, assets, tmp_path, "multi_node_colocated.sbatch", nodes=2,
                                             port=port, extra=(override,))  # fmt: skip
    assert plan["trainer_nodes"] == ["node1", "node2"] and plan["trainer_world_size"] == 2, plan
    assert sorted(e["node"] for e in plan["engines"]) == ["node1", "node2"], plan
    output = (tmp_path / f"dapo-colocated-{job_id}.out").read_text()
    assert f"master node1:{port}, net eth0" in output, output
    for e in plan["engines"]:
        log = (run_dir / "logs" / f"engines-{e['node']}.log").read_text()
        assert f"{e['node']} serves ['http://{cluster.address(e['node'])}:{e['port']}']" in log, report()
    launched = {n: _slurmd_launches(cluster, n, job_id) for n in ("node1", "node2")}
    assert all(launched.values()), launched
    assert not _slurmd_launches(cluster, "node3", job_id)  # a 2-node job: node3 stays out
    key = override.split(".")[1].split("=")[0]
    assert f"{key}: 2" in (run_dir / "config.yaml").read_text()
    gaps = _check_steps(run_dir, report)
    trainer_log = (run_dir / "logs" / "trainer-0.log").read_text()
    assert "weight sync: per node, sender ranks [0, 1] feed the servers on their own node" in trainer_log, report()
    model_bytes = _stage_bytes(str(assets / "model"), 1)[0]
    # Each node's sender sent the whole model to its own server: at TP2 both senders are stage 0, at PP2
    # one per stage (the bytes count under the sender's own stage).
    per_stage = {"tp2": {"sync/bytes_stage0": 2 * model_bytes},
                 "pp2": {"sync/bytes_stage0": model_bytes, "sync/bytes_stage1": model_bytes}}[layout]  # fmt: skip
    for r in read_metrics(str(run_dir)):
        if r["step"] > 0:
            assert r["sync/senders"] == 2 and r["sync/bytes"] == 2 * model_bytes, (r, report())
            assert {k: r[k] for k in per_stage} == per_stage, (r, report())
    for e in plan["engines"]:
        _check_tensor_route(run_dir, e["node"], report)
    _check_names_stay_inside(cluster)
    print(f"multi-node colocated sbatch ({layout} across node1+node2, SGLang CPU on each): gaps {gaps}")


def _check_tensor_route(run_dir, node, report):
    """``node``'s server took its weights as shared tensors, never over a broadcast group."""
    text = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob(f"*{node}*.log"))
    assert '"POST /update_weights_from_tensor HTTP' in text, report()
    assert "update_weights_from_distributed" not in text, report()


def test_namespace_nodes_run_one_job_and_leave_nothing_behind(tmp_path):
    """Two namespace nodes: a 2-node srun runs one task per node, each with its own hostname and address,
    reaching the other by name; stop() ends every daemon by PID and deletes namespaces, links and hosts
    files. (Fast: no training; runs in the main pass.)"""
    had_etc_netns = os.path.isdir("/etc/netns")
    cluster = NetnsSlurm(nodes=2)
    try:
        try:
            cluster.start()
        except NetnsRefused as e:
            print(f"multi-node SLURM skipped: {e}")
            pytest.skip(f"network namespaces refused by the kernel: {e}")
        pids = {name: proc.pid for name, proc in cluster.procs.items()}
        assert sorted(pids) == ["munged", "slurmctld", "slurmd-node1", "slurmd-node2"]
        # srun from the batch step on node1, as the sbatch scripts do; each task reports where it ran.
        (tmp_path / "probe.sh").write_text("echo $SLURMD_NODENAME $(hostname) $(getent hosts node1) $(hostname -I)\n")
        script = tmp_path / "probe.sbatch"
        script.write_text(f"#!/bin/bash\nsrun -N2 --ntasks-per-node=1 bash {tmp_path / 'probe.sh'}\n")
        job_id, _ = cluster.submit_and_wait(str(script), env={}, timeout_s=120, options=["-N2", "-o", "%j.out"],
                                            cwd=str(tmp_path))  # fmt: skip
        out = (tmp_path / f"{job_id}.out").read_text().splitlines()
        rows = sorted(line.split() for line in out if line.strip())
        a1, a2 = cluster.address("node1"), cluster.address("node2")
        assert rows == [["node1", "node1", a1, "node1", a1], ["node2", "node2", a1, "node1", a2]], rows
    finally:
        survivors = cluster.stop()
        left = cluster.leftovers()
        cluster.cleanup()
    assert survivors == [] and left == []
    assert os.path.isdir("/etc/netns") == had_etc_netns  # /etc as it was
    assert [name for name, pid in pids.items() if os.path.exists(f"/proc/{pid}")] == []

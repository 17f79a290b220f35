"""Placement planning from SLURM / torchrun environments: pure cases, errors, JSON, and the plan CLI."""

import os
import subprocess
import sys

import pytest

from dapo_megatron.config import ParallelConfig, RolloutConfig
from dapo_megatron.controller.placement import (
    EngineSlot,
    PlacementError,
    expand_nodelist,
    format_placement,
    load_placement,
    plan_placement,
    save_placement,
)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("localhost", ["localhost"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("a,b[2],c", ["a", "b2", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    from dapo_megatron.parallel.init import first_host_of_nodelist

    assert expand_nodelist(nodelist) == hosts
    assert first_host_of_nodelist(nodelist) == hosts[0]  # placement and rendezvous agree on the master


@pytest.mark.parametrize("bad", ["", "n[1-", "n]1[", "n[a-b]", "n[3-1]", "a,,b"])
def test_malformed_nodelist(bad):
    with pytest.raises(PlacementError, match="malformed"):
        expand_nodelist(bad)


def _slurm(nodelist, nnodes, tasks_per_node, gpus, **extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_NNODES": str(nnodes),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NTASKS": str(nnodes * tasks_per_node),
        "SLURM_GPUS_ON_NODE": str(gpus),
        "MASTER_PORT": "29611",
    }
    env.update(extra)
    return env


def test_slurm_two_nodes_of_eight_gpus_colocated():
    rollout = RolloutConfig(engine="sglang", mode="colocated", engine_tensor_parallel=2)
    p = plan_placement(_slurm("gpu[07-08]", 2, 8, 8), rollout, ParallelConfig(tensor=2, pipeline=2))
    assert p.source == "slurm" and p.mode == "colocated"
    assert p.nodes == p.trainer_nodes == ("gpu07", "gpu08")
    assert (p.trainer_ranks_per_node, p.trainer_world_size, p.gpus_per_node) == (8, 16, 8)
    assert (p.master_addr, p.master_port) == ("gpu07", 29611)
    assert len(p.engines) == 8  # 8 GPUs / TP 2 on each node
    assert p.engines_on("gpu08") == [
        EngineSlot("gpu08", 30010, 2, (0, 1)),
        EngineSlot("gpu08", 30018, 2, (2, 3)),
        EngineSlot("gpu08", 30026, 2, (4, 5)),
        EngineSlot("gpu08", 30034, 2, (6, 7)),
    ]
    assert (p.router_host, p.router_port) == ("gpu07", 30000)
    assert p.engines[0].url == "http://gpu07:30010"
    assert p.engine_nodes == ()


def test_slurm_disaggregated_two_trainer_nodes_one_engine_node():
    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=4, engine_tensor_parallel=2)
    env = _slurm("n[1-3]", 3, 8, 8)
    for engine_nodes in (1, None):  # None: as few nodes as hold the engines, here 1
        p = plan_placement(env, rollout, ParallelConfig(tensor=4), engine_nodes=engine_nodes)
        assert p.trainer_nodes == ("n1", "n2") and p.engine_nodes == ("n3",)
        assert p.trainer_world_size == 16 and p.master_addr == "n1"
        assert [(e.node, e.gpu_ids) for e in p.engines] == [
            ("n3", (0, 1)),
            ("n3", (2, 3)),
            ("n3", (4, 5)),
            ("n3", (6, 7)),
        ]
        assert p.engines_on("n1") == [] and p.router_host == "n3"


def test_disaggregated_engines_spill_to_a_second_engine_node():
    rollout = RolloutConfig(engine="vllm", mode="disaggregated", num_engines=3, engine_tensor_parallel=4)
    p = plan_placement(_slurm("a,b,c,d", 4, 8, 8), rollout, ParallelConfig())
    assert p.trainer_nodes == ("a", "b") and p.engine_nodes == ("c", "d")
    assert [(e.node, e.port, e.gpu_ids) for e in p.engines] == [
        ("c", 30010, (0, 1, 2, 3)),
        ("c", 30018, (4, 5, 6, 7)),
        ("d", 30010, (0, 1, 2, 3)),
    ]
    assert p.router_host is None and p.router_port == 0  # vLLM: no sglang-router


@pytest.mark.parametrize(
    "rollout, nodes, kwargs, message",
    [
        (
            RolloutConfig(engine="sglang", mode="disaggregated", num_engines=5, engine_tensor_parallel=2),
            3,
            {"engine_nodes": 1},
            "engines do not fit",
        ),
        (
            RolloutConfig(engine="sglang", mode="disaggregated", num_engines=1, engine_tensor_parallel=16),
            3,
            {},
            "does not fit in a node of 8 GPUs",
        ),
        (
            RolloutConfig(engine="sglang", mode="disaggregated", num_engines=40, engine_tensor_parallel=1),
            3,
            {},
            "leave no trainer node",
        ),
        (RolloutConfig(engine="embedded", mode="disaggregated"), 3, {}, "embedded engine"),
        (RolloutConfig(engine="sglang", mode="colocated", engine_tensor_parallel=3), 2, {}, "cannot tile"),
        (RolloutConfig(engine="sglang", mode="colocated"), 2, {"engine_nodes": 1}, "disaggregated only"),
    ],
)
def test_layouts_that_do_not_fit_are_clear_errors(rollout, nodes, kwargs, message):
    with pytest.raises(PlacementError, match=message):
        plan_placement(_slurm(f"n[1-{nodes}]", nodes, 8, 8), rollout, ParallelConfig(), **kwargs)


def test_trainer_layout_checks():
    colocated = RolloutConfig(engine="sglang")
    with pytest.raises(PlacementError, match="tensor\\*pipeline\\*context = 3"):
        plan_placement(_slurm("n[1-2]", 2, 8, 8), colocated, ParallelConfig(tensor=3))
    with pytest.raises(PlacementError, match="world_size=8"):
        plan_placement(_slurm("n[1-2]", 2, 8, 8), colocated, ParallelConfig(world_size=8))
    with pytest.raises(PlacementError, match="only 4 GPUs"):
        plan_placement(_slurm("n[1-2]", 2, 8, 4), colocated, ParallelConfig())
    env = _slurm("n1", 1, 2, 0)
    del env["SLURM_GPUS_ON_NODE"]
    with pytest.raises(PlacementError, match="GPUs per node are unknown"):
        plan_placement(env, RolloutConfig(engine="sglang", sglang_device="cuda"), ParallelConfig())
    # sglang_device=auto without GPUs: SGLang's CPU backend, one server per node, no GPU ids
    cpu = plan_placement(env, colocated, ParallelConfig())
    assert [(e.node, e.gpu_ids) for e in cpu.engines] == [("n1", ())] and cpu.router_host == "n1"


def test_gpu_count_sources_and_override():
    env = _slurm("n[1-2]", 2, 8, 0, SLURM_GPUS_PER_NODE="h100:8")
    del env["SLURM_GPUS_ON_NODE"]
    p = plan_placement(env, RolloutConfig(engine="sglang"), ParallelConfig())
    assert p.gpus_per_node == 8 and len(p.engines) == 16
    p = plan_placement(env, RolloutConfig(engine="sglang", engine_tensor_parallel=8), ParallelConfig(), gpus_per_node=8)
    assert [e.node for e in p.engines] == ["n1", "n2"]


def test_slurm_cpu_job_with_the_embedded_engine():
    env = {"SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    p = plan_placement(env, RolloutConfig(), ParallelConfig(tensor=2))
    assert (p.trainer_world_size, p.gpus_per_node, p.engines, p.router_host) == (2, 0, (), None)
    assert p.master_addr == "localhost" and p.master_port == 29500


def test_torchrun_environment():
    env = {
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "1234",
    }
    p = plan_placement(env, RolloutConfig(), ParallelConfig(pipeline=2))
    assert p.source == "torchrun" and p.nodes == ("10.0.0.5", "<node 1>")
    assert (p.trainer_ranks_per_node, p.trainer_world_size) == (4, 8)
    assert (p.master_addr, p.master_port) == ("10.0.0.5", 1234)
    with pytest.raises(PlacementError, match="needs a SLURM allocation"):
        plan_placement(env, RolloutConfig(engine="sglang", mode="disaggregated"), ParallelConfig(), gpus_per_node=4)


def test_no_launcher_is_one_local_rank():
    p = plan_placement({}, RolloutConfig(), ParallelConfig())
    assert (p.source, p.nodes, p.trainer_world_size) == ("local", ("localhost",), 1)


def test_json_round_trip_and_table(tmp_path):
    rollout = RolloutConfig(engine="sglang", mode="disaggregated", num_engines=2, engine_tensor_parallel=4)
    p = plan_placement(_slurm("gpu[1-3]", 3, 8, 8), rollout, ParallelConfig())
    save_placement(p, str(tmp_path / "sub" / "placement.json"))
    assert load_placement(str(tmp_path / "sub" / "placement.json")) == p
    table = format_placement(p)
    assert "trainer: 2 node(s) x 8 rank(s) = 16 ranks   master: gpu1:29611" in table
    assert "router: gpu3:30000" in table
    lines = table.splitlines()
    assert lines[-3].split()[:3] == ["gpu1", "trainer", "0-7"]
    assert lines[-2].split()[:3] == ["gpu2", "trainer", "8-15"]
    assert lines[-1].split() == ["gpu3", "engine", "-", ":30010[0,1,2,3]", ":30018[4,5,6,7]"]


def _cli_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE"))}
    env.update(extra)
    return env


def test_plan_cli_prints_the_table(tmp_path):
    env = _cli_env(_slurm("gpu[1-3]", 3, 8, 8))
    cmd = [
        sys.executable,
        "-m",
        "dapo_megatron.cli",
        "plan",
        "rollout.engine=sglang",
        "rollout.mode=disaggregated",
        "rollout.num_engines=8",
        "--engine-nodes",
        "1",
        "--json",
        str(tmp_path / "p.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "mode: disaggregated" in proc.stdout and "gpu3  engine" in proc.stdout
    assert len(load_placement(str(tmp_path / "p.json")).engines) == 8
    cmd[cmd.index("rollout.num_engines=8")] = "rollout.num_engines=9"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "engines do not fit" in proc.stderr

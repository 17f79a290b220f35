"""Real SLURM: a single-node cluster runs slurm/local_tiny.sbatch as a 2-rank gloo job, and
slurm/single_node_colocated.sbatch with real SGLang CPU servers (marker ``sglang``)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, SlurmJobError, slurm_cluster  # noqa: F401  (session fixture)

from dapo_megatron.observability.sinks import read_metrics
from tests.sglang_real import SGLANG_PYTHON, needs_sglang

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Each rank initialises torch.distributed from its SLURM variables, all-reduces rank + 1 and
# writes what it saw. (Stands in for `dapo-megatron train` until the training command exists.)
ALLREDUCE = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from dapo_megatron.parallel.init import init_distributed
    env = init_distributed(backend="gloo")
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    out = {"rank": env.rank, "world_size": env.world_size, "sum": t.item(), "master": env.master_addr,
           "procid": int(os.environ["SLURM_PROCID"]), "job": os.environ["SLURM_JOB_ID"]}
    with open(os.path.join(os.environ["RUN_DIR"], f"rank{env.rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
""")


def _job_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(DAPO_REPO=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_local_tiny_sbatch_two_rank_gloo_allreduce(slurm_cluster, tmp_path):  # noqa: F811
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    run_dir = tmp_path / "run"
    port = str(29000 + os.getpid() % 1000)  # not the job-id default: other clusters may run job 1 too
    env = _job_env(tmp_path, RUN_DIR=str(run_dir), MASTER_PORT=port, DAPO_CMD=f"{sys.executable} {script}")
    job_id, state = slurm_cluster.submit_and_wait(
        str(REPO / "slurm" / "local_tiny.sbatch"), env=env, timeout_s=240, cwd=str(tmp_path)
    )
    assert state == "COMPLETED"
    results = {}
    for rank in (0, 1):
        path = run_dir / f"rank{rank}.json"
        assert path.exists(), (
            f"rank {rank} wrote nothing; job output:\n{(tmp_path / f'dapo-tiny-{job_id}.out').read_text()}"
        )
        results[rank] = json.loads(path.read_text())
    for rank, got in results.items():
        assert got == {"rank": rank, "world_size": 2, "sum": 3.0, "master": "localhost", "procid": rank, "job": job_id}
    output = (tmp_path / f"dapo-tiny-{job_id}.out").read_text()
    assert f"master localhost:{port}" in output  # common.sh derived the rendezvous from the nodelist


def test_local_tiny_sbatch_trains_at_tp2(slurm_cluster, tmp_path):  # noqa: F811
    """The repo's sbatch script with its default command: `dapo-megatron train` on 2 SLURM tasks."""
    assets = tmp_path / "assets"
    tiny = str(REPO / "examples" / "tiny_cpu.yaml")
    cmd = [sys.executable, "-m", "dapo_megatron", "demo", "--assets-only", str(assets), "--config", tiny]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    run_dir = tmp_path / "run"
    port = str(30000 + os.getpid() % 1000)
    env = _job_env(tmp_path, RUN_DIR=str(run_dir), MASTER_PORT=port, DEMO_ASSETS=str(assets))
    job_id, state = slurm_cluster.submit_and_wait(
        str(REPO / "slurm" / "local_tiny.sbatch"), args=["parallel.tensor=2"], env=env, timeout_s=400, cwd=str(tmp_path)
    )
    output = (tmp_path / f"dapo-tiny-{job_id}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward/acc" in r] == [1, 2]
    assert records[-1]["sync/weight_version"] == 2 and "eval/acc" in records[-1]
    assert (run_dir / "checkpoints" / "step_000002" / "meta.json").is_file()
    assert "tensor: 2" in (run_dir / "config.yaml").read_text()


SGLANG_STEPS = 3
GAP_BOUND = 5e-3  # fp32 trainer and fp32 SGLang CPU server: gaps are about 2e-4 (tests/test_sglang_train.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(key: str) -> list:
    """PIDs of the processes whose command line carries ``key`` (the run's SGLang servers and router)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if key.encode() in (Path("/proc") / pid / "cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _tail(path: Path, chars: int = 4000) -> str:
    return f"--- {path} ---\n" + (path.read_text(errors="replace")[-chars:] if path.is_file() else "(missing)")


@needs_sglang
@pytest.mark.sglang
@pytest.mark.slow
def test_single_node_colocated_sbatch_trains_on_sglang_cpu_servers(slurm_cluster, tmp_path):  # noqa: F811
    """The shipped one-node script, as a user submits it, on this CPU node: the plan puts one SGLang CPU
    server (and the router) on the node, `dapo-megatron engines` serves them as an srun step, and
    `dapo-megatron train` uses them with a live weight sync before every rollout. Only the #SBATCH
    resources are overridden on the command line (1 task, 1 CPU, no GPU)."""
    assets = tmp_path / "assets"
    tiny = str(REPO / "examples" / "tiny_cpu.yaml")
    cmd = [sys.executable, "-m", "dapo_megatron", "demo", "--assets-only", str(assets), "--config", tiny]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    run_dir = tmp_path / "run"
    env = _job_env(tmp_path, RUN_DIR=str(run_dir), MASTER_PORT=str(_free_port()), DEMO_ASSETS=str(assets),
                   CONFIG=tiny)  # fmt: skip
    overrides = [
        "rollout.engine=sglang", f"rollout.sglang_python={SGLANG_PYTHON}", f"train.total_steps={SGLANG_STEPS}",
        "run.eval_every=0", "rollout.server_start_timeout_s=600",
        # free ports: another test session (or the SGLang tests) may serve on the defaults
        f"rollout.router_port={_free_port()}", f"rollout.engine_base_port={_free_port()}",
    ]  # fmt: skip
    # Command-line options win over the #SBATCH lines. SLURM 22.05 refuses any GPU request on a node
    # without gres (even --gres=none), but accepts --gpus-per-node=0, which replaces the script's 8.
    options = ["--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]
    script = str(REPO / "slurm" / "single_node_colocated.sbatch")
    logs = run_dir / "logs"

    def report(job_output: bool = True) -> str:
        """The job's output file (unless the SlurmJobError already holds it) and the tails of its logs."""
        parts = [_tail(p, 6000) for p in sorted(tmp_path.glob("dapo-1node-*.out"))] if job_output else []
        parts += [_tail(p) for p in sorted(logs.glob("engines-*.log"))]
        parts += [_tail(p) for p in sorted(logs.glob("sglang-*.log"))]
        parts += [_tail(p) for p in sorted(logs.glob("router-*.log"))]
        parts += [_tail(p, 6000) for p in sorted(logs.glob("trainer-*.log"))]
        return "\n".join(parts)

    key_file = run_dir / "engine_api_key"
    try:
        failure = state = None
        try:
            _, state = slurm_cluster.submit_and_wait(
                script, options=options, args=overrides, env=env, timeout_s=900, cwd=str(tmp_path)
            )
        except SlurmJobError as e:
            failure = str(e)
        if failure is not None:
            pytest.fail(f"{failure}\n{report(job_output=False)}", pytrace=False)
        assert state == "COMPLETED", report()
        plan = json.loads((run_dir / "placement.json").read_text())
        assert len(plan["engines"]) == 1 and plan["engines"][0]["gpu_ids"] == [], plan  # one CPU server
        engine_log = logs / f"sglang-{plan['engines'][0]['node']}-{plan['engines'][0]['port']}.log"
        assert engine_log.is_file(), report()
        steps = [r for r in read_metrics(str(run_dir)) if r["step"] > 0]
        assert [r["step"] for r in steps] == list(range(1, SGLANG_STEPS + 1)), report()
        for r in steps:
            assert r["sync/weight_version"] == r["step"], (r, report())  # the server serves this step's weights
            assert r["rollout/stale_samples"] == 0, (r, report())  # sampled with the previous step's
            assert r["rollout/logprob_gap_mean"] <= GAP_BOUND, (r, report())
        assert "weight check (first step)" in (logs / "trainer-0.log").read_text(), report()
        gaps = [f"{r['rollout/logprob_gap_mean']:.1e}" for r in steps]
        print(f"sbatch colocated on SGLang CPU: per-step mean |trainer - SGLang| log-prob gap {gaps}")
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key
        deadline = time.monotonic() + 10  # the job ended after its engine step stopped; allow reaping
        while _pids_with(key) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _pids_with(key) == [], f"SGLang processes outlived the job\n{report()}"
    finally:
        if key_file.is_file() and key_file.read_text().strip():  # never leave a server behind
            for pid in _pids_with(key_file.read_text().strip()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def test_failing_job_reports_its_output(slurm_cluster, tmp_path):  # noqa: F811
    env = _job_env(tmp_path, RUN_DIR=str(tmp_path / "run"), DAPO_CMD="echo rank-$SLURM_PROCID-says-bye; exit 3")
    with pytest.raises(AssertionError, match=r"(?s)JobState=FAILED.*rank-[01]-says-bye"):
        slurm_cluster.submit_and_wait(
            str(REPO / "slurm" / "local_tiny.sbatch"), env=env, timeout_s=120, cwd=str(tmp_path)
        )


def test_cluster_daemons_are_stopped_by_pid():
    cluster = LocalSlurm()
    try:
        cluster.start()
        pids = {name: proc.pid for name, proc in cluster.procs.items()}
        assert sorted(pids) == ["munged", "slurmctld", "slurmd"]
        for pid in pids.values():
            os.kill(pid, 0)  # alive while running
        assert cluster.client(["sinfo", "-h", "-o", "%t"]).stdout.strip() == "idle"
    finally:
        survivors = cluster.stop()
        cluster.cleanup()
    assert survivors == []
    assert [name for name, pid in pids.items() if _exists(pid)] == []


def _exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

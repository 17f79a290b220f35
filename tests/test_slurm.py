"""Real SLURM: a single-node cluster runs slurm/local_tiny.sbatch as a 2-rank gloo job."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, slurm_cluster  # noqa: F401  (session fixture)

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
    import subprocess

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
    assert (run_dir / "checkpoints" / "step_000002" / "meta.pt").is_file()
    assert "tensor: 2" in (run_dir / "config.yaml").read_text()


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

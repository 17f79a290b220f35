"""A real single-node SLURM cluster for tests: munge, slurmctld and slurmd on this machine.

    from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

    def test_job(slurm_cluster):
        job_id, state = slurm_cluster.submit_and_wait("slurm/local_tiny.sbatch", env=env, timeout_s=120)

Everything lives in a private folder (config, munge socket and key, state, spool, logs) and the
daemons listen on free ports, so a second cluster on the same machine (another test session) does
not collide, and the controller state is fresh on every start. Daemons are started as child
processes and stopped by their PIDs (TERM, wait, KILL), never by name. Every client call
(sinfo, scontrol, sbatch, scancel) has a timeout: with slurmctld down each would wait ~10 s.

Needs root (the daemons and munge's user switch) and, when slurmctld is missing, apt-get. Without
them the fixture fails with a message; it does not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import pytest

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
CLIENT_TIMEOUT_S = 10


class SlurmJobError(AssertionError):
    """A job did not complete; the message carries its record and output file."""


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_installed() -> None:
    """Install SLURM and munge with apt-get when slurmctld is missing (root only)."""
    if _which("slurmctld") and _which("munged") and _which("sbatch"):
        return
    if os.geteuid() != 0:
        raise RuntimeError("SLURM is not installed and installing it needs root (apt-get); run the tests as root")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(kib // 1024 - 2048, 512)


class LocalSlurm:
    """One private single-node cluster. ``start()`` / ``stop()``; ``env`` is for client commands."""

    def __init__(self) -> None:
        # /run (0755, root) rather than pytest's 0700 tmp: the munge user must reach its socket.
        base = "/run" if os.access("/run", os.W_OK) else None
        self.root = tempfile.mkdtemp(prefix="dapo-slurm-", dir=base)
        os.chmod(self.root, 0o755)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: Dict[str, subprocess.Popen] = {}
        self.submitted: List[str] = []
        self.env = {**os.environ, "SLURM_CONF": self.conf, "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH}

    # ----- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        """Install if needed, write the config, start munged, slurmctld, slurmd; wait for an idle node."""
        if os.geteuid() != 0:
            raise RuntimeError("the local SLURM cluster needs root (daemons, munge user); run the tests as root")
        ensure_installed()
        for sub in ("ctld", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub))
        self._setup_munge()
        self._write_conf()
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                f"--socket={self.munge_socket}",
                f"--key-file={self.root}/munge/munge.key",
                f"--pid-file={self.root}/munge/munged.pid",
                f"--log-file={self.root}/munge/munged.log",
                f"--seed-file={self.root}/munge/seed",
            ],
            user="munge",
        )
        self._wait_for(lambda: os.path.exists(self.munge_socket), 10, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        self._start_slurmds()
        self._wait_for(self._node_idle, timeout_s, f"the node(s) did not become idle in {timeout_s:.0f} s")

    def _start_slurmds(self) -> None:
        """One slurmd for the one node (a multi-node subclass starts one per node)."""
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", self.conf])

    def stop(self) -> List[int]:
        """Cancel our jobs, then stop slurmd, slurmctld, munged by PID. Returns PIDs still alive."""
        self._cancel_jobs()
        survivors = []
        # Every slurmd first (a multi-node cluster has one per node), then the controller, then munge.
        slurmds = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            if proc.poll() is None:
                survivors.append(proc.pid)
        return survivors

    def _cancel_jobs(self, timeout_s: float = 20.0) -> None:
        """Cancel the jobs we submitted and wait (bounded) until none is left running."""
        if not self.submitted or "slurmctld" not in self.procs:
            return
        ids = ",".join(self.submitted)
        deadline = time.monotonic() + timeout_s
        try:
            self.client(["scancel", *self.submitted], check=False)
            while time.monotonic() < deadline:
                if not self.client(["squeue", "-h", "-j", ids], check=False).stdout.strip():
                    return
                time.sleep(0.25)
        except subprocess.TimeoutExpired:
            return

    def leftovers(self) -> List[str]:
        """What the cluster made besides its processes and still finds after :meth:`stop`: nothing
        here (its folder goes with :meth:`cleanup`); subclasses that make more say so."""
        return []

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ----- clients -------------------------------------------------------------------------------
    def client(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster, bounded by ``CLIENT_TIMEOUT_S``."""
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT_S,
            env={**self.env, **(env or {}), "SLURM_CONF": self.conf},
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit_and_wait(
        self,
        script: str,
        *,
        env: Mapping[str, str],
        timeout_s: float,
        args: Sequence[str] = (),
        options: Sequence[str] = (),
        cwd: Optional[str] = None,
    ) -> Tuple[str, str]:
        """``sbatch [options] script [args]`` and poll until the job ends. Returns (job id, final JobState).

        ``options`` are sbatch options; given on the command line they win over the script's #SBATCH lines
        (e.g. ``--ntasks-per-node=1 --gpus-per-node=0`` to fit a GPU script onto this CPU node).

        Raises:
            SlurmJobError: the job ended in another state than COMPLETED, or ran past ``timeout_s``
                (then it is cancelled); the message includes the job record and its output file.
        """
        job_env = {**self.env, **env, "SLURM_CONF": self.conf}
        return submit_and_wait(
            script, env=job_env, timeout_s=timeout_s, args=args, options=options, cwd=cwd, on_submit=self.submitted
        )

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for name in ("slurmctld", *sorted(n for n in self.procs if n.startswith("slurmd")), "munged"):
            path = os.path.join(self.root, "log", f"{name}.out")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} ---\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    # ----- internals -----------------------------------------------------------------------------
    def _setup_munge(self) -> None:
        munge_dir = os.path.join(self.root, "munge")
        os.makedirs(munge_dir)
        os.chmod(munge_dir, 0o755)  # munged insists that everyone may traverse to its socket
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        shutil.chown(munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")

    def _node_lines(self) -> List[str]:
        """The NodeName and PartitionName lines of slurm.conf: here one node, this machine."""
        return [
            f"NodeName=localhost CPUs={os.cpu_count() or 1} RealMemory={_real_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]

    def _write_conf(self, ctld_host: str = "localhost") -> None:
        """slurm.conf; ``ctld_host`` is the SlurmctldHost value (``name(address)`` for other nodes)."""
        r = self.root
        lines = [
            "ClusterName=dapotest",
            f"SlurmctldHost={ctld_host}",
            "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "KillWait=5",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.%n.pid",  # %n: the node name, one file per slurmd
            f"SlurmdSpoolDir={r}/spool/%n",
            f"StateSaveLocation={r}/ctld",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            *self._node_lines(),
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: List[Optional[str]], user: Optional[str] = None) -> None:
        if None in argv:
            raise RuntimeError(f"{name}: executable not found on PATH or in /usr/sbin")
        # The child keeps its own copy of the log descriptor; ours can close at once.
        with open(os.path.join(self.root, "log", f"{name}.out"), "w") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user, start_new_session=True
            )

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs_tail()}")
        try:
            out = self.client(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        except subprocess.TimeoutExpired:
            return False
        states = out.stdout.split()
        return bool(states) and all(s == "idle" for s in states)

    def _wait_for(self, ready, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{message}\n{self.logs_tail()}")


def job_record(job_id: str, env: Mapping[str, str]) -> Dict[str, str]:
    """``scontrol show job -o`` as a dict (empty when the controller no longer knows the job)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        env=dict(env),
    )
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def job_report(job_id: str, record: Mapping[str, str]) -> str:
    """The job's state line and the tail of its output file, for failure messages."""
    out_path = record.get("StdOut", "")
    text = "(no output file)"
    if out_path and os.path.exists(out_path):
        with open(out_path, errors="replace") as f:
            text = f.read()[-6000:]
    keys = ("JobState", "Reason", "ExitCode", "RunTime", "NodeList")
    return f"job {job_id}: " + " ".join(f"{k}={record.get(k)}" for k in keys) + f"\n--- {out_path} ---\n{text}"


def submit_and_wait(
    script: str,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    args: Sequence[str] = (),
    options: Sequence[str] = (),
    cwd: Optional[str] = None,
    on_submit: Optional[List[str]] = None,
) -> Tuple[str, str]:
    """Submit ``script`` with ``sbatch --parsable [options] script [args]`` (``env`` must hold SLURM_CONF)
    and wait for its end. ``options`` are sbatch options (they win over the script's #SBATCH lines);
    ``args`` go to the script.

    Returns (job id, JobState). COMPLETED is success; any other end, or ``timeout_s`` passing
    (the job is then cancelled), raises :class:`SlurmJobError` with the job's output file.
    """
    proc = subprocess.run(
        ["sbatch", "--parsable", *options, script, *args],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        env=dict(env),
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise SlurmJobError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if on_submit is not None:
        on_submit.append(job_id)
    deadline = time.monotonic() + timeout_s
    record: Dict[str, str] = {}
    while time.monotonic() < deadline:
        record = job_record(job_id, env) or record
        state = record.get("JobState", "")
        if state in TERMINAL_STATES:
            if state != "COMPLETED":
                raise SlurmJobError(job_report(job_id, record))
            return job_id, state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=CLIENT_TIMEOUT_S, env=dict(env))
    raise SlurmJobError(f"timed out after {timeout_s:.0f} s (cancelled)\n" + job_report(job_id, record))


def start_or_fail(cluster: LocalSlurm, what: str, *, passthrough: Tuple[type, ...] = ()) -> None:
    """Start ``cluster``; when that fails, stop whatever started, clean up and fail the test naming
    ``what`` and any surviving PIDs. Exceptions of a ``passthrough`` type propagate (after the same
    cleanup) for the caller to handle."""
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        survivors = cluster.stop()
        cluster.cleanup()
        if isinstance(e, passthrough):
            raise
        pytest.fail(f"could not start {what}: {e}" + (f" (left PIDs {survivors})" if survivors else ""), pytrace=False)


def stop_and_check(cluster: LocalSlurm) -> List[str]:
    """Stop ``cluster`` by PID; assert no daemon survived. Returns ``cluster.leftovers()`` (what the
    cluster made besides processes and still finds), measured before the cleanup removes it."""
    survivors = cluster.stop()
    left = cluster.leftovers()
    cluster.cleanup()
    assert not survivors, f"SLURM daemons still alive after stop: PIDs {survivors}"
    return left


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster for the session; its daemons are stopped by PID afterwards."""
    cluster = LocalSlurm()
    start_or_fail(cluster, "the local SLURM cluster")
    yield cluster
    stop_and_check(cluster)


if __name__ == "__main__":  # manual use: python tests/slurm_cluster.py -> start, print sinfo, stop
    c = LocalSlurm()
    try:
        c.start()
        print(c.client(["sinfo"]).stdout, file=sys.stderr)
    finally:
        print("survivors:", c.stop(), file=sys.stderr)
        c.cleanup()

"""A real multi-node SLURM cluster on one machine: every node is a Linux network namespace.

    from slurm_netns import netns_cluster  # noqa: F401  (the module fixture: 3 nodes)

    def test_job(netns_cluster):
        netns_cluster.submit_and_wait("slurm/disaggregated.sbatch", env=env, timeout_s=900)

Layout (``S`` is a free third octet of 10.77.S.0/24, so two clusters on one machine do not collide):

    root namespace:  bridge ``dbr<tag>`` at 10.77.S.254; munged (unix socket in the private folder,
                     reachable from every namespace: unix sockets do not belong to a network namespace);
                     slurmctld (SlurmctldHost=localhost(10.77.S.254): nodes reach it on the bridge)
    node i (1..N):   network namespace ``dapo<tag>n<i>``: its end of a veth pair named ``eth0`` at 10.77.S.i
                     with the bridge as default route (so slurm/common.sh picks eth0 for gloo/NCCL) and
                     ``lo`` up; its own ``slurmd -N node<i>`` (NodeName=node<i> NodeAddr=10.77.S.i) in
                     its own UTS namespace (hostname node<i>) and mount namespace (below)

Names: ``/etc/netns/<namespace>/hosts`` maps ``node1..nodeN`` to their addresses and is bind-mounted over
/etc/hosts in the node's mount namespace, so slurmd and every job step it starts resolve node names to
namespace addresses. The root namespace's /etc/hosts is never touched: a node name resolves only inside
the cluster, so whatever reached ``node2`` by name went over the bridge between namespaces. Each node
also gets a private /dev/shm: shared-memory handles cannot pass between nodes, as on real machines.

Everything is started and stopped by PID (slurmd per namespace, slurmctld, munged); the namespaces,
the bridge and the hosts folders are deleted at teardown, and :meth:`NetnsSlurm.leftovers` says what
(if anything) is still there. Where the kernel refuses network namespaces the fixture skips, quoting
the refusal; every other start failure fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import List, Optional, Sequence

import pytest
from slurm_cluster import LocalSlurm, _which, start_or_fail, stop_and_check

SUBNET_PREFIX = "10.77"
BRIDGE_HOST = 254


class NetnsRefused(RuntimeError):
    """The kernel (or the container) does not let this process make network namespaces."""


def _ip(*args: str, netns: Optional[str] = None) -> subprocess.CompletedProcess:
    """``ip ...`` (inside ``netns`` when given); raises with ip's message on failure."""
    argv = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _free_octet() -> int:
    """A third octet S such that no interface of the root namespace holds an address in 10.77.S.0/24."""
    used = _ip("-o", "-4", "addr", "show").stdout
    start = os.getpid() % 200
    for k in range(200):
        octet = 10 + (start + k) % 200
        if f" {SUBNET_PREFIX}.{octet}." not in used:
            return octet
    raise RuntimeError(f"no free {SUBNET_PREFIX}.S.0/24 subnet on this machine")


def probe_netns() -> None:
    """Make and delete one namespace; raise :class:`NetnsRefused` with the kernel's words when refused."""
    name = f"dapoprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsRefused(f"`ip netns add` is refused here: {proc.stderr.strip() or proc.returncode}")
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class NetnsSlurm(LocalSlurm):
    """``nodes`` SLURM nodes, one network namespace each, served by one slurmctld."""

    def __init__(self, nodes: int = 3, cpus_per_node: int = 2, private_shm: bool = True) -> None:
        super().__init__()
        self.private_shm = private_shm
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.tag = format(os.getpid() % 0xFFFF, "x")  # short: interface names have at most 15 characters
        self.bridge = f"dbr{self.tag}"
        self.octet = 0
        self.made_netns: List[str] = []
        self.made_bridge = False
        self.made_etc_netns = False

    # ----- addresses -----------------------------------------------------------------------------
    def netns(self, node: str) -> str:
        return f"dapo{self.tag}n{self.nodes.index(node) + 1}"

    def address(self, node: str) -> str:
        """The node's address inside its namespace (10.77.S.i)."""
        return f"{SUBNET_PREFIX}.{self.octet}.{self.nodes.index(node) + 1}"

    @property
    def bridge_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.{BRIDGE_HOST}"

    def in_node(self, node: str, argv: Sequence[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``node``'s namespace (with its hosts file), as a job step would."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns(node), *argv], capture_output=True, text=True, timeout=timeout_s
        )

    # ----- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> None:
        """Namespaces and bridge first (raises :class:`NetnsRefused` where the kernel refuses them),
        then munged, slurmctld and one slurmd per namespace; waits until every node is idle."""
        if os.geteuid() != 0:
            raise RuntimeError("the multi-node SLURM cluster needs root (network namespaces, daemons)")
        probe_netns()
        self.octet = _free_octet()
        self._make_network()
        super().start(timeout_s=timeout_s)

    def stop(self) -> List[int]:
        """Daemons by PID (base class), then the namespaces, the bridge and the hosts folders."""
        survivors = super().stop()
        for ns in self.made_netns:
            # The host end first: a namespace's devices go away asynchronously after `ip netns del`.
            host_end = f"dv{self.tag}n{ns.rsplit('n', 1)[1]}"
            subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.made_netns = []
        if self.made_etc_netns:  # /etc/netns was ours: leave /etc as it was
            with contextlib.suppress(OSError):
                os.rmdir("/etc/netns")
            self.made_etc_netns = False
        if self.made_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
            self.made_bridge = False
        return survivors

    def leftovers(self) -> List[str]:
        """Namespaces, links and hosts folders of this cluster still present (empty after :meth:`stop`)."""
        names = [self.bridge, *(f"dv{self.tag}n{i + 1}" for i in range(len(self.nodes)))]
        links = _ip("-o", "link", "show").stdout
        out = [n for n in names if f" {n}:" in links or f" {n}@" in links]
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        out += [n for n in map(self.netns, self.nodes) if n in listed.split() or os.path.exists(f"/etc/netns/{n}")]
        return out

    # ----- network -------------------------------------------------------------------------------
    def _make_network(self) -> None:
        """Bridge at .254 in the root namespace; per node a namespace, a veth pair (host end on the bridge,
        ``eth0`` inside at .i, default route via the bridge) and its hosts file."""
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made_bridge = True
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes, start=1):
            ns, host_end = self.netns(node), f"dv{self.tag}n{i}"
            _ip("netns", "add", ns)
            self.made_netns.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{self.address(node)}/24", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("route", "add", "default", "via", self.bridge_address, netns=ns)
            self._write_hosts(node)

    def _write_hosts(self, node: str) -> None:
        """/etc/netns/<ns>/hosts: every node's name (also each node's hostname, see :meth:`_slurmd_argv`)."""
        folder = f"/etc/netns/{self.netns(node)}"
        self.made_etc_netns = self.made_etc_netns or not os.path.isdir("/etc/netns")
        os.makedirs(folder, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{self.address(n)} {n}" for n in self.nodes)]
        with open(os.path.join(folder, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")

    # ----- SLURM ---------------------------------------------------------------------------------
    def _write_conf(self, ctld_host: str = "localhost") -> None:
        # The controller runs in the root namespace; nodes reach it at the bridge address.
        super()._write_conf(ctld_host=f"localhost({self.bridge_address})")

    def _node_lines(self) -> List[str]:
        nodes = [
            f"NodeName={n} NodeAddr={self.address(n)} NodeHostname={n} CPUs={self.cpus_per_node} "
            "RealMemory=2048 State=UNKNOWN"
            for n in self.nodes
        ]
        return [*nodes, f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"]

    def _start_slurmds(self) -> None:
        for node in self.nodes:
            os.makedirs(os.path.join(self.root, "spool", node), exist_ok=True)
            self._spawn(f"slurmd-{node}", self._slurmd_argv(node))

    def _slurmd_argv(self, node: str) -> List[str]:
        """slurmd in its own UTS namespace (hostname = node name, as on a real node: srun's %N and
        `hostname -s` name the node), its own mount namespace (the node's hosts file over /etc/hosts
        and, with ``private_shm``, its own /dev/shm: shared memory does not cross real nodes either)
        and the node's network namespace. Not ``ip netns exec``: it remounts /sys, hiding the cgroup mounts
        slurmd needs. unshare, sh and nsenter each exec the next, so the PID we hold is slurmd's."""
        setup = f"hostname {node} && mount --bind /etc/netns/{self.netns(node)}/hosts /etc/hosts"
        if self.private_shm:
            setup += " && mount -t tmpfs -o mode=1777,size=4g tmpfs /dev/shm"
        slurmd = f"{_which('slurmd')} -D -N {node} -f {self.conf}"
        script = f"{setup} && exec nsenter --net=/run/netns/{self.netns(node)} {slurmd}"
        return [_which("unshare") or "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script]


@pytest.fixture(scope="module")
def netns_cluster():
    """Three namespace nodes and one controller for the module; everything torn down by PID afterwards."""
    cluster = NetnsSlurm(nodes=3)
    try:
        start_or_fail(cluster, "the multi-node SLURM cluster", passthrough=(NetnsRefused,))
    except NetnsRefused as e:
        print(f"multi-node SLURM skipped: {e}")
        pytest.skip(f"network namespaces refused by the kernel: {e}")
    yield cluster
    left = stop_and_check(cluster)
    assert not left, f"network namespaces / links left after stop: {left}"


if __name__ == "__main__":  # manual use: python tests/slurm_netns.py -> start, print sinfo, stop
    import sys

    c = NetnsSlurm()
    try:
        c.start()
        print(c.client(["sinfo", "-N"]).stdout, file=sys.stderr)
        print(c.client(["srun", "-N3", "bash", "-c", "echo $SLURMD_NODENAME $(hostname -I)"]).stdout,
              file=sys.stderr)  # fmt: skip
    finally:
        print("survivors:", c.stop(), "left:", c.leftovers(), file=sys.stderr)
        c.cleanup()

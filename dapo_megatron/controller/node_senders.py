"""Which trainer rank feeds which colocated server, when the servers sit on several nodes.

Colocated weights travel as shared tensors: CUDA-IPC handles on GPUs, shared-memory files on CPU. Both
only reach a server on the sender's own node. So with servers on several nodes, each server is fed by
one *sender*, a trainer rank on its node, which must hold every layer:

* its own stage's layers from its TP all-gather (which leaves the full tensor on every rank of the
  group), in any DP replica, since the replicas hold the same weights;
* with PP > 1, the other stages' layers from its pipeline group: each stage's member of that group
  broadcasts its stage's buckets to the others (the only bytes that cross nodes; megatron puts the
  pipeline dimension outermost, so the stages of a replica usually sit on different nodes).

The stages go one after another (a rank is a sender of its own stage and a receiver of the others),
so unlike the leaders' path they do not overlap; every node's senders run at once.
:func:`~dapo_megatron.weights.node_gather.iter_node_buckets` does the gathering; the plan here is pure
(:func:`plan_node_senders`), and :func:`server_is_local` is the one question each rank answers about
its machine.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Sequence, Tuple


@dataclass(frozen=True)
class RankPlace:
    """One trainer rank as the plan sees it: its pipeline ``stage``, DP ``replica`` (DP rank with CP)
    and ``tp_rank`` (a pipeline group is the ranks sharing both), and the indices of the servers on
    its node."""

    rank: int
    stage: int
    replica: int
    tp_rank: int
    servers: FrozenSet[int]


@dataclass(frozen=True)
class NodeRole:
    """What one rank does in a per-node sync. ``gathers``: its TP group all-gathers its stage (the
    same on every rank of a TP group: the whole replica gathers). ``relays``: its pipeline group
    shares every stage's buckets (PP > 1). ``emits``: it is a sender and keeps what it receives."""

    gathers: bool
    relays: bool
    emits: bool


@dataclass(frozen=True)
class NodePlan:
    """``senders``: rank -> the servers it feeds. ``replicas``: the DP replicas that gather.
    ``pipelines``: the ``(replica, tp_rank)`` pipeline groups that relay (those with a sender)."""

    senders: Dict[int, Tuple[int, ...]]
    replicas: FrozenSet[int]
    pipelines: FrozenSet[Tuple[int, int]]
    pp: int

    def role(self, place: RankPlace) -> NodeRole:
        relays = self.pp > 1 and (place.replica, place.tp_rank) in self.pipelines
        return NodeRole(gathers=place.replica in self.replicas, relays=relays, emits=place.rank in self.senders)


def plan_node_senders(places: Sequence[RankPlace], workers: Sequence[str], pp: int) -> NodePlan:
    """Each server's sender is the rank on its node in the lowest DP replica, lowest rank first, so
    one replica gathers wherever a node holds part of it. Raises ``ValueError`` naming the server when
    no trainer rank shares its node (a colocated server must sit beside the trainer)."""
    chosen: Dict[int, List[int]] = {}
    for w, url in enumerate(workers):
        here = sorted((p.replica, p.rank) for p in places if w in p.servers)
        if not here:
            raise ValueError(
                f"colocated weight sync: no trainer rank runs on the node of the server {url}. Colocated weights "
                "travel as shared tensors (CUDA IPC on GPUs), which do not cross nodes: start colocated servers on "
                "the trainer's nodes, or use rollout.mode=disaggregated"
            )
        chosen.setdefault(here[0][1], []).append(w)
    by_rank = {p.rank: p for p in places}
    senders = [by_rank[r] for r in chosen]
    return NodePlan(
        senders={r: tuple(ws) for r, ws in chosen.items()},
        replicas=frozenset(p.replica for p in senders),
        pipelines=frozenset((p.replica, p.tp_rank) for p in senders),
        pp=pp,
    )


def server_is_local(url: str, rank0_host: str) -> bool:
    """Whether the server at ``url`` runs on this rank's node. A loopback URL names trainer rank 0's node
    (the local fleet it starts), identified by host name ``rank0_host``; any other address is local when
    this machine can bind it, i.e. when one of its interfaces holds it."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise ValueError(f"weight sync: cannot read a host from the server URL {url!r}")
    try:
        address = socket.gethostbyname(host)
    except OSError as e:
        raise RuntimeError(f"weight sync: {socket.gethostname()} cannot resolve the server host {host!r}: {e}") from e
    if ipaddress.ip_address(address).is_loopback:
        return socket.gethostname() == rank0_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True

"""Each pipeline stage's own line to the SGLang servers, for the per-stage weight sync.

Built once per run by :func:`connect_stage_link`, a collective called on every trainer rank after the
driver (rank 0) has built its engines. Rank 0 shares what a stage leader needs to reach the servers
(worker URLs, API key, engine TP, transport, update backend) over the default group; every stage
leader (pp stage ``s``, TP rank 0, DP rank 0; rank 0 leads stage 0) then opens its own client:

* ``distributed`` transport (disaggregated): one ``update_weights_from_distributed`` group per
  (stage, server), named ``dapo_pp<s>_w<i>``, with the leader as group rank 0 and the server's TP ranks
  after it; the servers dial the leader at its address on the route to them (:func:`address_towards`).
  These are the only update groups of a run: rank 0 joins none of its own (it leads stage 0).
  Why one per server and not one per stage spanning every server: SGLang 0.5.23 serves one
  weight request at a time per server (the tokenizer holds its pause lock across the call, the
  scheduler is single-threaded), so two servers may serve two stages' buckets in opposite orders; a
  broadcast spanning both servers would then wait on each other forever. With a group per server a
  leader sends to all its servers at once and every server's current request always has its sender.
  The groups are created stage after stage (a barrier between), for the same reason.
* ``tensor`` transport (colocated): the sender POSTs ``update_weights_from_tensor`` itself, the tensors
  shared by CUDA IPC (GPU) or shared-memory files (CPU), which reach only servers on the sender's node.
  Every server on every stage leader's node: the leaders send. Else, every server on rank 0's node: the
  gather to rank 0. Else (servers on several nodes): per-node senders
  (:mod:`~dapo_megatron.controller.node_senders`), each node's servers fed by that node's own ranks.

Only SGLang engines take this path. In-process engines (embedded, vLLM) live in rank 0's process, so
their sync keeps gathering the model to rank 0 (:func:`~dapo_megatron.controller.weight_sync.push_weights`
with no link).
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from dapo_megatron.weights.stage_gather import StageRole, stage_role


@dataclass
class StageLink:
    """This rank's part of the per-stage sync. ``enabled`` is the same on every rank. On a stage
    leader, ``engines`` are one :class:`~dapo_megatron.rollout.sglang.SGLangEngine` per server (its own
    update group each), driven on the private event ``loop``."""

    enabled: bool
    role: Optional[StageRole] = None
    engines: List[Any] = field(default_factory=list)
    loop: Optional[asyncio.AbstractEventLoop] = None
    reason: str = ""
    node: Optional[Any] = None  # per-node senders: this rank's NodeRole (controller/node_senders.py)

    def send_bucket(self, bucket: List[Any]) -> None:
        """Sender: one bucket to each of its servers at once (unstamped: rank 0 stamps the version at the end)."""
        assert self.loop is not None and self.engines, "send_bucket is for senders"

        async def to_all() -> None:  # gather inside the coroutine: its futures belong to self.loop
            await asyncio.gather(*(e.load_bucket(bucket, None) for e in self.engines))

        self.loop.run_until_complete(to_all())

    def close(self) -> None:
        if self.loop is not None:
            for engine in self.engines:
                self.loop.run_until_complete(engine.shutdown())
            self.loop.close()
            self.loop = None


def _describe(engines: List[Any], backend: str) -> Dict[str, Any]:
    """Rank 0: what a stage leader needs to reach the servers, or why the link is off."""
    from dapo_megatron.rollout.sglang import SGLangEngine

    if len(engines) != 1 or not isinstance(engines[0], SGLangEngine):
        return {"enabled": False, "reason": "in-process engines live in rank 0: the model is gathered there"}
    e = engines[0]
    return {"enabled": True, "workers": e.live_workers, "api_key": e.api_key, "engine_tp": e.engine_tp,
            "transport": e.transport, "backend": backend, "local": e.owner is not None,
            "host": socket.gethostname()}  # fmt: skip


def address_towards(url: str) -> str:
    """This machine's IP address on the route to ``url``'s host: the address the server dials back.

    Why not the hostname: on a cluster node it often resolves to a loopback alias (127.0.1.1) or to a
    management interface the servers cannot reach, while the route the OS picks to the server's host
    is, by construction, an interface that reaches it. A UDP ``connect`` sends nothing; it only asks
    the kernel for that route."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"weight sync: cannot read a host from the server URL {url!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((parts.hostname, parts.port or 80))
        except OSError as e:
            raise RuntimeError(f"weight sync: no route from {socket.gethostname()} to the server {url}: {e}") from e
        return str(s.getsockname()[0])


def _share(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (one small object over the default group, at start-up only)."""
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def connect_stage_link(engines: List[Any], *, backend: str, timeout_s: float = 300.0) -> StageLink:
    """Collective over all trainer ranks (see the module docstring). ``engines``: rank 0's engine pool
    (``[]`` elsewhere); ``backend``: ``nccl`` or ``gloo`` for the update groups. A PP=1 run gets a link
    too: its single stage leader is rank 0, which then sends without the gather."""
    info = _share(_describe(engines, backend) if dist.get_rank() == 0 else None)
    role = stage_role()
    plan = None
    if info["enabled"] and info["transport"] == "tensor":
        info, plan = _tensor_route(info, role)
    link = StageLink(enabled=info["enabled"], role=role, reason=info.get("reason", ""))
    if dist.get_rank() == 0:  # say once which path the run's weight syncs take, and why
        if plan is not None:
            print(f"weight sync: per node, sender ranks {sorted(plan.senders)} feed the servers on their own "
                  f"node (DP replicas {sorted(plan.replicas)} gather), tensor transport", flush=True)  # fmt: skip
        elif link.enabled:
            print(f"weight sync: from each of {role.pp} pipeline stage(s) in parallel, {info['transport']} transport")
        else:
            print(f"weight sync: gathered to rank 0 ({link.reason})", flush=True)
    if not link.enabled:
        return link
    if plan is not None:
        link.node = plan.role(_place(role, ()))
        mine = [info["workers"][w] for w in plan.senders.get(dist.get_rank(), ())]
        if mine:
            _open_leader(link, {**info, "workers": mine}, role.stage, timeout_s)
        return link
    for stage in range(role.pp):  # one stage at a time: see the module docstring
        if role.leader and role.stage == stage:
            _open_leader(link, info, stage, timeout_s)
        dist.barrier()
    return link


def _place(role: StageRole, servers: Any) -> Any:
    from dapo_megatron.controller.node_senders import RankPlace

    return RankPlace(rank=dist.get_rank(), stage=role.stage, replica=role.replica, tp_rank=role.tp_rank,
                     servers=frozenset(servers))  # fmt: skip


def _tensor_route(info: Dict[str, Any], role: StageRole) -> Tuple[Dict[str, Any], Any]:
    """Collective: how shared tensors reach the servers (module docstring). Returns ``(info, plan)``:
    the leaders' path (``plan`` None), the gather to rank 0 (``info`` disabled) or a per-node
    :class:`~dapo_megatron.controller.node_senders.NodePlan`. Raises ``ValueError`` (on every rank) when
    a server has no trainer rank on its node, or the per-node route would need expert parallelism."""
    from dapo_megatron.controller.node_senders import plan_node_senders, server_is_local

    workers = info["workers"]
    local = [w for w, url in enumerate(workers) if server_is_local(url, info["host"])]
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, (_place(role, local), role.leader))
    everywhere = frozenset(range(len(workers)))
    if all(p.servers == everywhere for p, leader in places if leader):
        return info, None
    if places[0][0].servers == everywhere:
        reason = "a stage leader is not on the servers' node: shared tensors cannot reach them"
        return {"enabled": False, "reason": reason}, None
    if role.ep != 1:
        raise ValueError(
            f"colocated weight sync: servers on several nodes take per-node senders, which need parallel.expert=1 "
            f"(got {role.ep}); use rollout.mode=disaggregated for expert parallelism"
        )
    return info, plan_node_senders([p for p, _ in places], workers, role.pp)


def _open_leader(link: StageLink, info: Dict[str, Any], stage: int, timeout_s: float) -> None:
    from dapo_megatron.rollout.process import free_port
    from dapo_megatron.rollout.sglang import SGLangEngine

    link.loop = asyncio.new_event_loop()
    link.engines = [
        SGLangEngine(url, engine_tp=info["engine_tp"], api_key=info["api_key"], transport=info["transport"])
        for url in info["workers"]
    ]
    if info["transport"] != "distributed":
        return
    bind = "127.0.0.1" if info["local"] else ""
    for i, (url, engine) in enumerate(zip(info["workers"], link.engines)):
        link.loop.run_until_complete(
            engine.init_weight_group(
                "127.0.0.1" if info["local"] else address_towards(url),
                free_port(bind),
                backend=info["backend"],
                group_name=f"dapo_pp{stage}_w{i}",
                timeout_s=timeout_s,
            )  # fmt: skip
        )

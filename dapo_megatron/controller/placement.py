"""Placement: which nodes run trainer ranks, which GPUs serve rollout engines, where to rendezvous.

Pure planning from the launcher's environment (SLURM or torchrun) and the config; nothing is
started here. The sbatch scripts in ``slurm/`` print the plan (``dapo-megatron plan``) and save
it as JSON next to the run so engine launchers and the trainer read one agreed answer.

Modes (``rollout.mode``):
    colocated       every allocated node trains; engines time-share the trainer GPUs, one engine
                    per ``engine_tensor_parallel`` GPUs, covering each node's trainer GPUs.
    disaggregated   the first ``len(nodes) - engine_nodes`` nodes train, the last ``engine_nodes``
                    nodes serve ``rollout.num_engines`` engines, packed node by node.

The ``embedded`` engine runs inside trainer rank 0, so it has no engine slots and no router.
Engines never span nodes: ``engine_tensor_parallel`` must fit in one node.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

# Ports of engines sharing a node are this far apart: room for each server's auxiliary ports.
ENGINE_PORT_STRIDE = 8


class PlacementError(ValueError):
    """The allocation cannot hold the requested layout; the message says what does not fit."""


@dataclass(frozen=True)
class EngineSlot:
    """One rollout engine server: its node, HTTP port, TP degree and the node-local GPU ids it uses."""

    node: str
    port: int
    tp: int
    gpu_ids: Tuple[int, ...]

    @property
    def url(self) -> str:
        return f"http://{self.node}:{self.port}"


@dataclass(frozen=True)
class Placement:
    """Where everything runs.

    Fields:
        mode: ``colocated`` or ``disaggregated``.
        nodes: every node of the allocation, in launcher order.
        trainer_nodes: the nodes running trainer ranks (a prefix of ``nodes``).
        trainer_ranks_per_node: trainer processes per trainer node (one per GPU on GPU nodes).
        trainer_world_size: ``len(trainer_nodes) * trainer_ranks_per_node``.
        gpus_per_node: GPUs per node; 0 when unknown or none (CPU runs).
        master_addr / master_port: torch.distributed rendezvous of the trainer ranks.
        engines: engine servers (empty for the embedded engine).
        router_host / router_port: sglang-router address; None / 0 when there is no router.
        source: where the environment came from: ``slurm``, ``torchrun`` or ``local``.
    """

    mode: str
    nodes: Tuple[str, ...]
    trainer_nodes: Tuple[str, ...]
    trainer_ranks_per_node: int
    trainer_world_size: int
    gpus_per_node: int
    master_addr: str
    master_port: int
    engines: Tuple[EngineSlot, ...]
    router_host: Optional[str]
    router_port: int
    source: str

    @property
    def engine_nodes(self) -> Tuple[str, ...]:
        return tuple(n for n in self.nodes if n not in self.trainer_nodes)

    def engines_on(self, node: str) -> List[EngineSlot]:
        """The engine slots a launcher on ``node`` must start."""
        return [e for e in self.engines if e.node == node]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Placement:
        fields = dict(raw)
        fields["engines"] = tuple(
            EngineSlot(e["node"], int(e["port"]), int(e["tp"]), tuple(e["gpu_ids"])) for e in raw["engines"]
        )
        fields["nodes"] = tuple(raw["nodes"])
        fields["trainer_nodes"] = tuple(raw["trainer_nodes"])
        return cls(**fields)


@dataclass(frozen=True)
class _Launch:
    """What the launcher environment says, before the config is applied."""

    source: str
    nodes: Tuple[str, ...]
    ranks_per_node: Optional[int]
    gpus_per_node: Optional[int]
    total_tasks: Optional[int]
    master_addr: str
    master_port: int


def plan_placement(
    environ: Mapping[str, str],
    rollout_cfg: Any,
    parallel_cfg: Any,
    *,
    gpus_per_node: Optional[int] = None,
    engine_nodes: Optional[int] = None,
) -> Placement:
    """Plan trainer ranks and engine slots for ``rollout_cfg.mode`` in this environment.

    Args:
        environ: ``os.environ`` or a test's dict. SLURM (``SLURM_JOB_NODELIST``, ``SLURM_JOB_NUM_NODES``
            / ``SLURM_NNODES``, ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``, ``SLURM_NTASKS``,
            ``SLURM_GPUS_ON_NODE`` / ``SLURM_GPUS_PER_NODE``) wins over torchrun (``WORLD_SIZE``,
            ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); with neither, one local node.
        rollout_cfg: ``cfg.rollout`` (engine, mode, num_engines, engine_tensor_parallel, ports).
        parallel_cfg: ``cfg.parallel`` (tensor, pipeline, context, world_size).
        gpus_per_node: overrides the GPU count read from the environment.
        engine_nodes: disaggregated only: nodes (at the end of the node list) that serve engines;
            None means as few as hold ``rollout.num_engines``.

    Raises:
        PlacementError: the layout does not fit the allocation (the message says what to change).
    """
    launch = _read_launch(environ, gpus_per_node)
    if rollout_cfg.mode == "colocated":
        if engine_nodes:
            raise PlacementError("--engine-nodes applies to rollout.mode=disaggregated only")
        trainer_nodes = launch.nodes
    else:
        trainer_nodes = _split_disaggregated(launch, rollout_cfg, engine_nodes)
    ranks = _ranks_per_node(launch, rollout_cfg.mode)
    world = ranks * len(trainer_nodes)
    _check_world(world, launch, rollout_cfg.mode, parallel_cfg)
    engines = _engine_slots(launch, rollout_cfg, trainer_nodes, ranks)
    has_router = rollout_cfg.engine == "sglang"
    return Placement(
        mode=rollout_cfg.mode,
        nodes=launch.nodes,
        trainer_nodes=trainer_nodes,
        trainer_ranks_per_node=ranks,
        trainer_world_size=world,
        gpus_per_node=launch.gpus_per_node or 0,
        master_addr=launch.master_addr,
        master_port=launch.master_port,
        engines=engines,
        router_host=engines[0].node if has_router else None,
        router_port=rollout_cfg.router_port if has_router else 0,
        source=launch.source,
    )


def _read_launch(environ: Mapping[str, str], gpus_override: Optional[int]) -> _Launch:
    if environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"):
        launch = _read_slurm(environ)
    elif environ.get("WORLD_SIZE"):
        launch = _read_torchrun(environ)
    else:
        launch = _Launch("local", ("localhost",), None, None, None, "localhost", _port(environ))
    if gpus_override is not None:
        if gpus_override < 0:
            raise PlacementError(f"--gpus-per-node must be >= 0, got {gpus_override}")
        launch = replace(launch, gpus_per_node=gpus_override)
    return launch


def expand_nodelist(nodelist: str) -> List[str]:
    """Every host of a SLURM node list, in order: ``"gpu[01-03,07],cpu5"`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Several bracket groups in one name multiply (``"r[1-2]-n[1-2]"`` -> r1-n1 r1-n2 r2-n1 r2-n2);
    a range keeps the zero padding of its start (``[08-10]`` -> 08 09 10). Its first host is the
    one ``parallel.init.first_host_of_nodelist`` picks, so placement and rendezvous agree.
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            break
        if ch == "," and depth == 0:
            items.append(nodelist[start:i].strip())
            start = i + 1
    if depth != 0 or not all(items):
        raise PlacementError(f"malformed SLURM node list {nodelist!r}")
    hosts: List[str] = []
    for item in items:
        hosts.extend(_expand_item(item, nodelist))
    return hosts


def _expand_item(item: str, nodelist: str) -> List[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise PlacementError(f"malformed SLURM node list {nodelist!r}")
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    out = []
    for part in match.group(1).split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise PlacementError(f"malformed SLURM node list {nodelist!r}: range {part!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_item(f"{head}{n:0{len(lo)}d}{tail}", nodelist))
    return out


def _read_slurm(environ: Mapping[str, str]) -> _Launch:
    from dapo_megatron.parallel.init import first_host_of_nodelist

    nodelist = environ.get("SLURM_JOB_NODELIST") or environ["SLURM_NODELIST"]
    nodes = tuple(expand_nodelist(nodelist))
    count = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    if count and int(count) != len(nodes):
        raise PlacementError(f"SLURM_JOB_NODELIST {nodelist!r} names {len(nodes)} nodes but SLURM says {count}")
    return _Launch(
        source="slurm",
        nodes=nodes,
        ranks_per_node=_slurm_tasks_per_node(environ),
        gpus_per_node=_slurm_gpus(environ),
        total_tasks=_int_or_none(environ.get("SLURM_NTASKS")),
        master_addr=environ.get("MASTER_ADDR") or first_host_of_nodelist(nodelist),
        master_port=_port(environ),
    )


def _read_torchrun(environ: Mapping[str, str]) -> _Launch:
    world = int(environ["WORLD_SIZE"])
    local = int(environ.get("LOCAL_WORLD_SIZE") or world)
    if world % local:
        raise PlacementError(f"torchrun WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
    master = environ.get("MASTER_ADDR") or "localhost"
    # torchrun names only the master's host; the other nodes are known by their index.
    nodes = (master,) + tuple(f"<node {i}>" for i in range(1, world // local))
    return _Launch("torchrun", nodes, local, None, world, master, _port(environ))


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> Optional[int]:
    text = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts = {int(part.split("(")[0]) for part in text.split(",")}  # "8(x2)" or "4,3"
    if len(counts) != 1:
        raise PlacementError(f"tasks per node differ across nodes ({text!r}); request --ntasks-per-node")
    return counts.pop()


def _slurm_gpus(environ: Mapping[str, str]) -> Optional[int]:
    if environ.get("SLURM_GPUS_ON_NODE"):
        return int(environ["SLURM_GPUS_ON_NODE"])
    per_node = environ.get("SLURM_GPUS_PER_NODE")  # "8" or "h100:8"
    if per_node:
        match = re.search(r"(\d+)$", per_node)
        if match:
            return int(match.group(1))
    return None


def _ranks_per_node(launch: _Launch, mode: str) -> int:
    ranks = launch.ranks_per_node
    if ranks is None and mode == "colocated" and launch.total_tasks:
        ranks = launch.total_tasks // len(launch.nodes)
    if ranks is None:
        ranks = launch.gpus_per_node or 1  # one rank per GPU; one CPU rank on a GPU-less node
    if launch.gpus_per_node and ranks > launch.gpus_per_node:
        raise PlacementError(
            f"{ranks} trainer ranks per node but only {launch.gpus_per_node} GPUs per node; "
            "use --ntasks-per-node equal to the GPUs per node"
        )
    return ranks


def _check_world(world: int, launch: _Launch, mode: str, parallel_cfg: Any) -> None:
    if mode == "colocated" and launch.total_tasks and launch.total_tasks != world:
        raise PlacementError(f"SLURM_NTASKS={launch.total_tasks} but {len(launch.nodes)} nodes x ranks = {world}")
    if parallel_cfg.world_size and parallel_cfg.world_size != world:
        raise PlacementError(f"parallel.world_size={parallel_cfg.world_size} but the plan has {world} trainer ranks")
    model_parallel = parallel_cfg.tensor * parallel_cfg.pipeline * parallel_cfg.context
    if world % model_parallel:
        raise PlacementError(
            f"{world} trainer ranks cannot hold tensor*pipeline*context = {model_parallel}; "
            "change the node count or the parallel layout"
        )


def _split_disaggregated(launch: _Launch, rollout_cfg: Any, engine_nodes: Optional[int]) -> Tuple[str, ...]:
    if rollout_cfg.engine == "embedded":
        raise PlacementError("the embedded engine runs inside the trainer; use rollout.mode=colocated")
    if launch.source == "torchrun":
        raise PlacementError("disaggregated mode needs a SLURM allocation: torchrun knows only trainer nodes")
    per_node = _engines_per_node(launch, rollout_cfg)
    needed = math.ceil(rollout_cfg.num_engines / per_node)
    if engine_nodes is None:
        engine_nodes = needed
    if engine_nodes < 1:
        raise PlacementError(f"--engine-nodes must be >= 1 in disaggregated mode, got {engine_nodes}")
    if engine_nodes < needed:
        raise PlacementError(
            f"engines do not fit: rollout.num_engines={rollout_cfg.num_engines} engines of "
            f"engine_tensor_parallel={rollout_cfg.engine_tensor_parallel} GPUs need {needed} engine nodes of "
            f"{launch.gpus_per_node} GPUs, but only {engine_nodes} were given; raise --engine-nodes or lower "
            "rollout.num_engines"
        )
    if engine_nodes >= len(launch.nodes):
        raise PlacementError(
            f"{engine_nodes} engine nodes leave no trainer node in an allocation of {len(launch.nodes)} nodes; "
            "allocate more nodes or use fewer engine nodes"
        )
    return launch.nodes[: len(launch.nodes) - engine_nodes]


def _cpu_engines(launch: _Launch, rollout_cfg: Any) -> bool:
    """SGLang servers on CPUs: asked for (``rollout.sglang_device=cpu``), or ``auto`` with no GPU."""
    device = getattr(rollout_cfg, "sglang_device", "auto")
    return rollout_cfg.engine == "sglang" and (device == "cpu" or (device == "auto" and not launch.gpus_per_node))


def _engines_per_node(launch: _Launch, rollout_cfg: Any, gpus: Optional[int] = None) -> int:
    gpus = launch.gpus_per_node if gpus is None else gpus
    tp = rollout_cfg.engine_tensor_parallel
    if _cpu_engines(launch, rollout_cfg):
        return rollout_cfg.num_engines  # CPU servers take no GPU; the node's cores are shared
    if not gpus:
        raise PlacementError(
            f"rollout.engine={rollout_cfg.engine!r} needs GPUs, but the GPUs per node are unknown; "
            "request them (#SBATCH --gpus-per-node) or pass --gpus-per-node"
        )
    if tp > gpus:
        raise PlacementError(
            f"rollout.engine_tensor_parallel={tp} does not fit in a node of {gpus} GPUs; engines never span nodes"
        )
    return gpus // tp


def _engine_slots(
    launch: _Launch, rollout_cfg: Any, trainer_nodes: Tuple[str, ...], ranks: int
) -> Tuple[EngineSlot, ...]:
    if rollout_cfg.engine == "embedded":
        return ()
    tp = rollout_cfg.engine_tensor_parallel
    if rollout_cfg.mode == "colocated":
        # Engines share the trainer GPUs 0..ranks-1 of every node, so TP must tile them exactly.
        if ranks % tp:
            raise PlacementError(
                f"colocated engines of engine_tensor_parallel={tp} cannot tile the {ranks} trainer GPUs of a node"
            )
        per_node = _engines_per_node(launch, rollout_cfg, gpus=min(ranks, launch.gpus_per_node or 0))
        hosts, total = trainer_nodes, per_node * len(trainer_nodes)
    else:
        per_node = _engines_per_node(launch, rollout_cfg)
        hosts, total = launch.nodes[len(trainer_nodes) :], rollout_cfg.num_engines
    slots = []
    for index in range(total):
        node, local = hosts[index // per_node], index % per_node
        gpu_ids = () if _cpu_engines(launch, rollout_cfg) else tuple(range(local * tp, (local + 1) * tp))
        slots.append(EngineSlot(node, rollout_cfg.engine_base_port + local * ENGINE_PORT_STRIDE, tp, gpu_ids))
    return tuple(slots)


def format_placement(p: Placement) -> str:
    """A human-readable table of the plan, one row per node."""
    head = [
        f"mode: {p.mode}   source: {p.source}   nodes: {len(p.nodes)}   gpus/node: {p.gpus_per_node or '-'}",
        f"trainer: {len(p.trainer_nodes)} node(s) x {p.trainer_ranks_per_node} rank(s) = {p.trainer_world_size} "
        f"ranks   master: {p.master_addr}:{p.master_port}",
        f"engines: {len(p.engines) if p.engines else 'none (embedded in trainer rank 0)'}"
        + (f"   router: {p.router_host}:{p.router_port}" if p.router_host else ""),
    ]
    rows = [("node", "role", "trainer ranks", "engines (port: gpus)")]
    for node in p.nodes:
        trains = node in p.trainer_nodes
        first = p.trainer_nodes.index(node) * p.trainer_ranks_per_node if trains else 0
        ranks = f"{first}-{first + p.trainer_ranks_per_node - 1}" if trains else "-"
        slots = " ".join(f":{e.port}[{','.join(map(str, e.gpu_ids))}]" for e in p.engines_on(node)) or "-"
        role = "trainer+engine" if trains and p.engines_on(node) else "trainer" if trains else "engine"
        rows.append((node, role, ranks, slots))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    table = ["  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3] for r in rows]
    return "\n".join(head + [""] + table)


def save_placement(p: Placement, path: str) -> None:
    """Write the plan as JSON (atomically: temp file then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(p.to_dict(), f, indent=1)
    os.replace(tmp, path)


def load_placement(path: str) -> Placement:
    """Read a plan written by :func:`save_placement`."""
    with open(path) as f:
        return Placement.from_dict(json.load(f))


def _port(environ: Mapping[str, str]) -> int:
    from dapo_megatron.parallel.init import DEFAULT_MASTER_PORT

    return int(environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT)


def _int_or_none(text: Optional[str]) -> Optional[int]:
    return int(text) if text else None

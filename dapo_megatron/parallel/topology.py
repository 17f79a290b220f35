"""Trainer topology arithmetic: pure, checked before any process group exists.

The trainer world is split as ``world = tp * pp * cp * dp`` (megatron-core's order
``tp-cp-ep-dp-pp``); expert parallelism (EP) folds into the data-parallel ranks of the MoE layers,
so ``dp`` must be a multiple of ``ep``. The MoE layers' own layout is megatron's ``tp-ep-dp-pp`` with
the expert-tensor-parallel degree (ETP) in the ``tp`` slot, so ``etp * ep * pp`` must divide the
world (megatron's rule in ``initialize_model_parallel``). Virtual pipeline stages (``vpp``) split each pipeline rank's
layers into interleaved chunks and need ``pp > 1``.

No ``torch.distributed`` here: everything is plain integers, tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class _ParallelSection(Protocol):
    """The fields of ``dapo_megatron.config.ParallelConfig`` this module reads."""

    tensor: int
    pipeline: int
    virtual_pipeline: int
    context: int
    expert: int
    expert_tensor: int


@dataclass(frozen=True)
class Topology:
    """Parallel degrees of the trainer.

    Fields:
        world_size: number of trainer ranks.
        tp: tensor-parallel degree.
        pp: pipeline-parallel degree.
        vpp: model chunks per pipeline rank (interleaved schedule); 1 means off.
        cp: context-parallel degree.
        ep: expert-parallel degree (MoE); must divide ``dp``.
        etp: expert-tensor-parallel degree (MoE): each routed expert's linears are split over
            ``etp`` ranks. ``0`` (the default) means ``tp``, megatron's default; it is resolved in
            ``__post_init__``, so a built ``Topology`` always holds the degree megatron gets.

    Invariants: ``world_size == tp * pp * cp * dp`` with ``dp >= 1`` an integer;
    ``world_size % (etp * ep * pp) == 0``.
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 0

    def __post_init__(self) -> None:
        if self.etp == 0 and not isinstance(self.etp, bool):
            object.__setattr__(self, "etp", self.tp)  # frozen: resolve "same as tp" once, here
        for name in ("world_size", "tp", "pp", "vpp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology.{name} must be an integer >= 1, got {value!r}")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"Topology: virtual pipeline vpp={self.vpp} needs pipeline parallelism (pp > 1), got pp=1")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel != 0:
            raise ValueError(
                f"Topology: world_size={self.world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}"
            )
        dp = self.world_size // model_parallel
        if dp % self.ep != 0:
            raise ValueError(
                f"Topology: expert parallelism ep={self.ep} must divide the data-parallel degree "
                f"dp={dp} (world_size={self.world_size}, tp*pp*cp={model_parallel})"
            )
        expert_model = self.etp * self.ep * self.pp
        if self.world_size % expert_model != 0:
            raise ValueError(
                f"Topology: world_size={self.world_size} is not divisible by etp*ep*pp = "
                f"{self.etp}*{self.ep}*{self.pp} = {expert_model} (the MoE layers' layout)"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: ``world_size // (tp * pp * cp)``."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one full model replica: ``tp * pp * cp``."""
        return self.tp * self.pp * self.cp

    @classmethod
    def from_config(cls, parallel_cfg: _ParallelSection, world_size: int) -> Topology:
        """Build from a ``ParallelConfig`` (``cfg.parallel``) and the launcher's world size."""
        return cls(
            world_size=world_size,
            tp=parallel_cfg.tensor,
            pp=parallel_cfg.pipeline,
            vpp=parallel_cfg.virtual_pipeline,
            cp=parallel_cfg.context,
            ep=parallel_cfg.expert,
            etp=parallel_cfg.expert_tensor,
        )

    def describe(self) -> str:
        """One line for logs, e.g. ``world=8 tp=2 pp=2 vpp=1 cp=1 ep=1 dp=2`` (``etp=N`` added
        before ``dp`` when it differs from ``tp``)."""
        etp = f" etp={self.etp}" if self.etp != self.tp else ""
        head = f"world={self.world_size} tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} ep={self.ep}"
        return f"{head}{etp} dp={self.dp}"


def check_model_fits(topology: Topology, *, num_layers: int, num_attention_heads: int, num_query_groups: int) -> None:
    """Raise ``ValueError`` when the model cannot be split over ``topology``.

    Checks: attention heads and key/value groups divide by ``tp`` (each TP rank holds whole heads),
    ``num_attention_heads`` divides by ``num_query_groups`` (GQA), and the layers divide evenly
    into ``pp * vpp`` pipeline chunks.
    """
    problems = []
    if num_attention_heads % topology.tp != 0:
        problems.append(f"num_attention_heads={num_attention_heads} is not divisible by tp={topology.tp}")
    if num_query_groups % topology.tp != 0:
        problems.append(f"num_query_groups (key/value heads)={num_query_groups} is not divisible by tp={topology.tp}")
    if num_query_groups < 1 or num_attention_heads % num_query_groups != 0:
        problems.append(
            f"num_attention_heads={num_attention_heads} is not divisible by num_query_groups={num_query_groups}"
        )
    chunks = topology.pp * topology.vpp
    if num_layers % chunks != 0:
        problems.append(f"num_layers={num_layers} is not divisible by pp*vpp = {topology.pp}*{topology.vpp} = {chunks}")
    if problems:
        raise ValueError(f"model does not fit topology ({topology.describe()}): " + "; ".join(problems))

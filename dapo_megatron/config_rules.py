"""Validation rules that span many config fields, kept out of ``config.py`` so that file stays small.

Each rule is a pure function returning the problem as ``"dotted.key: what was expected"`` (or
``None``); :mod:`dapo_megatron.config` raises it as a ``ConfigError``. Stdlib only: importing the
config must stay cheap and must not pull in torch or megatron.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional


def non_finite_float(node: Any, prefix: str = "") -> Optional[str]:
    """The first float field under the dataclass ``node`` that is inf or nan, as a problem line.

    Invariant after it returns None: every float in the tree is finite. Why it matters: ``inf``
    passes every ``> 0`` range check, and an infinite learning rate turns every weight into NaN in one
    update; an infinite clip bound or timeout silently switches the mechanism off.
    """
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problem = non_finite_float(value, key + ".")
            if problem:
                return problem
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{key}: expected a finite number, got {value!r}"
    return None


def non_string_item(values: Iterable[Any], key: str) -> Optional[str]:
    """The first item of ``values`` that is not a string, as ``key[i]: ...`` (file lists hold paths)."""
    for i, item in enumerate(values):
        if not isinstance(item, str):
            return f"{key}[{i}]: expected a string (a file path), got {type(item).__name__} {item!r}"
    return None


def expert_layout_problem(world_size: int, model_parallel: int, expert: int) -> Optional[str]:
    """Why ``expert`` ranks cannot fold into the data-parallel degree, or None.

    megatron places expert parallelism inside the data-parallel ranks of the MoE layers, so EP must
    divide ``dp = world_size / model_parallel``. ``world_size == 0`` (taken from the launcher) and a
    world that ``model_parallel`` does not divide (reported by the world-size rule) are skipped.
    """
    if world_size == 0 or world_size % model_parallel != 0:
        return None
    dp = world_size // model_parallel
    if dp % expert == 0:
        return None
    return (
        f"parallel.expert: expert parallelism {expert} must divide the data-parallel degree "
        f"world_size/(tensor*pipeline*context) = {world_size}/{model_parallel} = {dp}"
    )


def expert_tensor_problem(world_size: int, expert_tensor: int, expert: int, pipeline: int) -> Optional[str]:
    """Why the MoE layers' layout does not fit ``world_size``, or None.

    megatron-core lays the MoE layers out as ``tp-ep-dp-pp`` with the expert-tensor-parallel
    degree in the ``tp`` slot, and ``initialize_model_parallel`` requires ``world_size`` to be a
    multiple of ``expert_tensor * expert * pipeline`` (the rest is the expert-data-parallel degree).
    ``expert_tensor`` is the resolved degree (``parallel.expert_tensor`` or, when 0, ``tensor``);
    ``world_size == 0`` (taken from the launcher) is skipped.
    """
    expert_model = expert_tensor * expert * pipeline
    if world_size == 0 or world_size % expert_model == 0:
        return None
    return (
        f"parallel.expert_tensor: {world_size} ranks cannot hold the MoE layers' expert_tensor*expert*pipeline = "
        f"{expert_tensor}*{expert}*{pipeline} = {expert_model}; the world size must be a multiple of it"
    )


ROUTING_ENGINES = ("embedded", "sglang")  # engines that return routed experts (SamplingParams.return_routed_experts)


def routing_replay_problem(routing_replay: str, engine: str, replay_rollouts: str = "") -> Optional[str]:
    """Why ``algo.routing_replay`` cannot work with ``rollout.engine``, or None.

    ``rollout`` replays the experts the engine chose, so the engine must return them; training on
    dumped steps (``run.replay_rollouts``) reads them from the dump instead, whatever the engine.
    """
    if routing_replay != "rollout" or replay_rollouts or engine in ROUTING_ENGINES:
        return None
    return (
        f"algo.routing_replay: 'rollout' needs an engine that returns routed experts ({', '.join(ROUTING_ENGINES)}), "
        f"but rollout.engine is {engine!r}; use algo.routing_replay: none"
    )

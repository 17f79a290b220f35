"""``python tests/kill_at_phase.py PHASE STEP <dapo-megatron args>``: the real command line, SIGKILLed
by itself right after PHASE of training step STEP (a crash at an exact phase boundary).

PHASE is one of :data:`PHASES`, named after the loop's step helpers; step 0 is the work before the
first step (the initial weight push and the "before" evaluation). Nothing in the product changes:
the helpers are wrapped here, in the test process, before the CLI runs.
"""

import os
import signal
import sys

from dapo_megatron.cli import main
from dapo_megatron.controller import loop
from dapo_megatron.controller.session import TrainingSession

PHASES = ("generate", "train", "sync", "eval", "log", "save")
_TARGETS = {  # phase -> (owner, attribute) of the helper after which to die
    "generate": (loop, "collect_groups"),
    "train": (loop, "train_actor"),
    "sync": (loop, "sync_engines"),
    "eval": (loop, "run_eval"),
    "log": (loop, "log_step"),
    "save": (TrainingSession, "save"),
}


def arm(phase: str, step: int) -> None:
    """Make the process SIGKILL itself when ``phase`` of ``step`` has just returned."""
    current = {"step": 0}  # the step in progress; collect_groups starts each one
    start_of_step = loop.collect_groups

    def tracking(s, step_now, *args, **kwargs):
        current["step"] = step_now
        return start_of_step(s, step_now, *args, **kwargs)

    loop.collect_groups = tracking
    owner, name = _TARGETS[phase]
    inner = getattr(owner, name)

    def dying(*args, **kwargs):
        out = inner(*args, **kwargs)
        if current["step"] == step:
            os.kill(os.getpid(), signal.SIGKILL)  # no finally blocks, no flush: like a node failure
        return out

    setattr(owner, name, dying)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    raise SystemExit(main(sys.argv[3:]))

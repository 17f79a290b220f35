"""The per-stage weight sync on real SGLang CPU servers: `dapo-megatron train` with 2 trainer ranks at PP=2
(torchrun), where each pipeline stage's leader streams its own layers to the server while the other
stage does the same: disaggregated over its own ``update_weights_from_distributed`` group, colocated by
POSTing ``update_weights_from_tensor`` itself.

What it proves, per step: both stage leaders sent, and each sent exactly the bytes of the layers its
stage owns (computed here from the model's config, not from the sender); the server serves the step's
version; the first step's weight check passed (the engine's log-probs match the trainer's after the
sync, ``rollout.weight_check_max_gap``); and, from the server's own request log, the version was
stamped once per sync, after the last bucket of every stage."""

import math
import os
import re
import sys

import pytest

from dapo_megatron.observability.sinks import read_metrics
from tests.cli_runs import TINY, cli_env, write_demo_assets
from tests.sglang_real import SGLANG_PYTHON, needs_sglang

pytestmark = [needs_sglang, pytest.mark.sglang, pytest.mark.slow]

STEPS = 2
GAP_BOUND = 5e-3  # fp32 on both sides, as in test_sglang_train


def _stage_bytes(model_dir: str, pp: int) -> dict:
    """HF bytes each stage owns: ``{stage: bytes}`` for fp32 weights at ``pp`` stages."""
    from dapo_megatron.controller.engines import read_hf_config
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.weights.mapping import hf_shapes
    from dapo_megatron.weights.stage_gather import stage_items

    spec = model_spec_from_hf(read_hf_config(model_dir))
    shapes = hf_shapes(spec)
    out = {}
    for stage in range(pp):
        names = [n for item in stage_items(spec, pp, 1, stage) for n in item.hf_names if n in shapes]
        numel = sum(math.prod(shapes[n]) for n in names)
        out[stage] = 4 * numel
    return out


@pytest.mark.parametrize(
    "mode,route", [("disaggregated", "update_weights_from_distributed"), ("colocated", "update_weights_from_tensor")]
)
def test_pp2_stages_send_their_own_layers_in_parallel(tmp_path, mode, route):
    """disaggregated: each leader broadcasts over its own gloo group; colocated: each leader POSTs its
    tensors itself (shared-memory files on CPU, CUDA IPC handles on a GPU)."""
    import subprocess

    assets = write_demo_assets(tmp_path / "assets")
    run_dir = tmp_path / "run"
    port = str(25000 + os.getpid() % 2000)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
            "-m", "dapo_megatron", "train", "--config", TINY, f"run.dir={run_dir}", "rollout.engine=sglang",
            f"rollout.sglang_python={SGLANG_PYTHON}", f"train.total_steps={STEPS}", "run.eval_every=0",
            f"rollout.mode={mode}", "rollout.num_engines=1", "parallel.pipeline=2"]  # fmt: skip
    done = subprocess.run(args, env=cli_env(assets), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"train failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "weight check (first step)" in done.stdout  # the gap was within rollout.weight_check_max_gap

    expected = _stage_bytes(str(assets / "model"), 2)
    assert expected[0] > 0 and expected[1] > 0 and expected[0] != expected[1]
    steps = [r for r in read_metrics(str(run_dir)) if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert r["sync/bytes_stage0"] == expected[0], r  # stage 0: embedding + its layers
        assert r["sync/bytes_stage1"] == expected[1], r  # stage 1: its layers + final norm
        assert r["sync/bytes"] == expected[0] + expected[1]
        assert r["sync/weight_version"] == r["step"]
        assert r["rollout/logprob_gap_mean"] <= GAP_BOUND, r
    _check_server_log(run_dir, route, min_syncs=STEPS + 1)  # the initial push before step 1, then one per step
    print(f"PP=2 per-stage sync, {mode}: stage bytes {expected}, per-step seconds "
          f"{[(r['sync/seconds_stage0'], r['sync/seconds_stage1']) for r in steps]}")  # fmt: skip


def _check_server_log(run_dir, route: str, *, min_syncs: int) -> None:
    """The server's request log: every sync is begin -> buckets of both stages -> end -> one version
    stamp, and no stamp falls between buckets. (Colocated runs sync once more after each save, when the
    trainer took the devices back, so the count is a lower bound.)"""
    logs = sorted((run_dir / "logs").glob("sglang*.log"))
    assert logs, list((run_dir / "logs").iterdir())
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    events = re.findall(rf'"POST /(begin_weight_update|{route}|end_weight_update|update_weight_version) HTTP', text)
    syncs = events.count("begin_weight_update")
    assert syncs >= min_syncs and events.count("update_weight_version") == syncs, events
    i = 0
    for _ in range(syncs):
        assert events[i] == "begin_weight_update", events[i:]
        j = events.index("end_weight_update", i)
        assert j - i - 1 >= 2, events[i:j]  # at least one bucket from each stage
        assert set(events[i + 1 : j]) == {route}
        assert events[j + 1] == "update_weight_version", events[j:]
        i = j + 2
    assert i == len(events), events[i:]  # nothing after the last stamp
    if route == "update_weights_from_distributed":
        groups = set(re.findall(r"group_name=(dapo_pp\d+_w\d+)", text))
        assert groups == {"dapo_pp0_w0", "dapo_pp1_w0"}, groups  # one update group per stage leader

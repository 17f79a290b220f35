"""Metric sinks (jsonl, console, W&B offline), phase timers and NVML telemetry."""

import json
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest

from dapo_megatron.observability import gpu as gpu_mod
from dapo_megatron.observability import metric_names as M
from dapo_megatron.observability.gpu import NvmlReader, gpu_metrics
from dapo_megatron.observability.sinks import MetricsLogger, format_console_line, read_metrics, wandb_settings
from dapo_megatron.observability.timers import PhaseTimer


def test_jsonl_one_line_per_step_and_appends(tmp_path):
    with MetricsLogger(str(tmp_path), console=False) as log:
        log.log(1, {M.REWARD_ACC: 0.25, M.DS_ROUNDS: 2})
        log.log(2, {M.REWARD_ACC: 0.5})
    with MetricsLogger(str(tmp_path), console=False) as log:  # a resumed run appends
        log.log(3, {M.REWARD_ACC: 0.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0][M.REWARD_ACC] == 0.25 and recs[0][M.DS_ROUNDS] == 2
    assert isinstance(recs[0]["wall_time"], float)
    assert read_metrics(str(tmp_path)) == recs


def test_nonfinite_values_become_null_and_are_flagged(tmp_path):
    with MetricsLogger(str(tmp_path), console=False) as log:
        log.log(7, {M.ACTOR_GRAD_NORM: float("nan"), M.ACTOR_APPROX_KL: float("inf"), M.REWARD_MEAN: -0.5})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    rec = json.loads(text)
    assert rec[M.ACTOR_GRAD_NORM] is None and rec[M.ACTOR_APPROX_KL] is None
    assert rec["nonfinite"] == [M.ACTOR_GRAD_NORM, M.ACTOR_APPROX_KL]
    assert rec[M.REWARD_MEAN] == -0.5


def test_tensor_values_are_converted_and_bad_values_rejected(tmp_path):
    import torch

    with MetricsLogger(str(tmp_path), console=False) as log:
        log.log(1, {M.ACTOR_ENTROPY: torch.tensor(1.5)})
        with pytest.raises(TypeError, match="actor/x"):
            log.log(2, {"actor/x": "high"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(3, {"step": 1.0})
    assert read_metrics(str(tmp_path))[0][M.ACTOR_ENTROPY] == 1.5


def test_read_metrics_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/acc": 0.1}\n{"step": 2, "rew')
    assert read_metrics(str(path)) == [{"step": 1, "reward/acc": 0.1}]
    # A new logger cuts the torn fragment off before appending, so the file stays valid JSONL.
    with MetricsLogger(str(tmp_path), console=False) as log:
        log.log(2, {M.REWARD_ACC: 0.2})
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]


def test_read_metrics_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(str(path))


def test_sigkill_loses_no_completed_line(tmp_path):
    # The child logs 3 steps, then is SIGKILLed by itself; all 3 lines must be on disk.
    code = textwrap.dedent(f"""
        import os, signal
        from dapo_megatron.observability.sinks import MetricsLogger
        log = MetricsLogger({str(tmp_path)!r}, console=False)
        for s in range(3):
            log.log(s, {{"reward/acc": s / 10}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    assert [r["reward/acc"] for r in read_metrics(str(tmp_path))] == [0.0, 0.1, 0.2]


def test_console_line_shows_preferred_keys_in_order(capsys, tmp_path):
    line = format_console_line(4, {"other/x": 1.0, M.ACTOR_ENTROPY: 0.123456, M.REWARD_ACC: 0.5})
    assert line == "step 4 | reward/acc 0.5 | actor/entropy 0.1235"
    assert format_console_line(1, {"a/b": 2}) == "step 1 | a/b 2"
    with MetricsLogger(str(tmp_path), jsonl=False) as log:
        log.log(4, {M.REWARD_ACC: 0.5})
    assert "step 4 | reward/acc 0.5" in capsys.readouterr().out
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # any network attempt would fail
    cfg = {"project": "dapo-test", "name": "offline", "mode": "offline", "config": {"algo": {"eps": 0.28}}}
    with MetricsLogger(str(tmp_path), console=False, wandb_cfg=cfg) as log:
        log.log(1, {M.REWARD_ACC: 0.5})
        log.log(2, {M.REWARD_ACC: float("nan")})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no offline run file was written"
    assert len(read_metrics(str(tmp_path))) == 2


def test_wandb_settings_and_cfg_validation(tmp_path):
    from dapo_megatron.config import RunConfig

    assert wandb_settings(RunConfig(wandb=False)) is None
    got = wandb_settings(RunConfig(wandb=True, name="r1", wandb_mode="disabled"), {"a": 1})
    assert got == {"project": "dapo_megatron", "name": "r1", "mode": "disabled", "config": {"a": 1}}
    with pytest.raises(ValueError, match="unknown keys"):
        MetricsLogger(str(tmp_path), console=False, wandb_cfg={"entity_typo": "x"})
    with pytest.raises(ValueError, match="mode"):
        MetricsLogger(str(tmp_path), console=False, wandb_cfg={"mode": "sometimes"})


def test_wandb_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match="not installed"):
        MetricsLogger(str(tmp_path), console=False, wandb_cfg={"mode": "offline"})


def test_phase_timer_accumulates_per_phase():
    now = [0.0]
    synced = []
    timer = PhaseTimer(synchronize=lambda: synced.append(1), clock=lambda: now[0])
    for dt in (2.0, 3.0):  # two generation rounds in one step add up
        with timer("generate"):
            now[0] += dt
    with pytest.raises(KeyError), timer("train"):  # time counts even when the body raises
        now[0] += 0.5
        raise KeyError
    assert timer.metrics() == {M.TIME_GENERATE: 5.0, M.TIME_TRAIN: 0.5}
    assert timer.seconds("reward") == 0.0 and len(synced) == 6
    with pytest.raises(RuntimeError, match="already"), timer("sync"), timer("sync"):
        pass
    timer.reset()
    assert timer.metrics() == {}


def test_phase_timer_real_clock():
    timer = PhaseTimer()
    with timer("sync"):
        sum(range(10000))
    assert 0 < timer.metrics()[M.TIME_SYNC] < 5


def test_metric_names_are_the_agreed_keys():
    assert M.TIME_KEYS == ("time/generate_s", "time/reward_s", "time/logprob_s", "time/train_s", "time/sync_s")
    assert len(set(M.ALL_KEYS)) == len(M.ALL_KEYS) == 19
    assert all(k.count("/") == 1 for k in M.ALL_KEYS)


def test_gpu_metrics_is_empty_without_a_gpu():
    assert gpu_metrics() == {}
    assert gpu_metrics() == {}  # second call: cached failure, still no exception


def _fake_pynvml(fail_init=False):
    class NVMLError(Exception):
        pass

    mod = types.SimpleNamespace(NVMLError=NVMLError, init_calls=0)

    def init():
        mod.init_calls += 1
        if fail_init:
            raise NVMLError("Library Not Found")

    mod.nvmlInit = init
    mod.nvmlDeviceGetCount = lambda: 2
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)
    mod.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50 + h)
    return mod


def test_gpu_metrics_reads_every_device_and_inits_once(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader()
    got = reader.read()
    assert got == {
        "gpu/0/mem_used_gib": 1.0,
        "gpu/0/mem_total_gib": 80.0,
        "gpu/0/util_pct": 50.0,
        "gpu/1/mem_used_gib": 2.0,
        "gpu/1/mem_total_gib": 80.0,
        "gpu/1/util_pct": 51.0,
        "gpu/mem_used_gib_max": 2.0,
    }
    reader.read()
    assert fake.init_calls == 1

    def lost(h):
        raise fake.NVMLError("GPU is lost")

    fake.nvmlDeviceGetMemoryInfo = lost
    assert reader.read() == {}


def test_gpu_metrics_init_failure_is_remembered(monkeypatch):
    fake = _fake_pynvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    reader = NvmlReader()
    assert reader.read() == {} and reader.read() == {}
    assert fake.init_calls == 1
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert NvmlReader().read() == {}
    assert isinstance(gpu_mod._DEFAULT_READER, NvmlReader)


def test_nan_metric_round_trip_keeps_nan_distinct_from_missing(tmp_path):
    with MetricsLogger(str(tmp_path), console=False) as log:
        log.log(1, {M.ACTOR_GRAD_NORM: math.nan})
        log.log(2, {M.REWARD_ACC: 1.0})
    r1, r2 = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert M.ACTOR_GRAD_NORM in r1 and r1["nonfinite"] == [M.ACTOR_GRAD_NORM]
    assert M.ACTOR_GRAD_NORM not in r2 and "nonfinite" not in r2

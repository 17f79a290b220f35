"""A checkpoint is data only, and a broken one is named before megatron reads it.

Security (issue 15, item 1): loading never unpickles code. Crafted files whose objects call
``os.system`` in ``__reduce__`` (to touch a marker file) sit where each pickle used to be read:
an old-format ``meta.pt``, its pickled ``extra_state``, the RNG file, megatron's ``common.pt`` and
torch's ``.metadata``. Each is refused (or never read) and the marker never appears.

Broken checkpoints (item 13): a missing or truncated ``.distcp`` and a missing ``common.pt`` give a
:class:`CheckpointError` naming the folder and the file (expected vs found size); ``latest_checkpoint``
skips to the newest intact checkpoint and says why; ``export`` gives one line and exit code 2.

The checkpoints are real: one megatron process (``tests.distributed_harness``) saves two of them,
before and after one update, and runs the cases that need an actor.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cli_runs import BIN

pytestmark = pytest.mark.multiproc


class Touch:
    """Unpickling this runs ``touch <marker>``: the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _legacy_meta(extra_state: bytes, scheduler: dict) -> dict:
    """An old-format ``meta.pt`` (pickled extra_state) with otherwise valid fields."""
    layout = {"world_size": 1, "tp": 1, "pp": 1, "vpp": 1, "dp": 1}
    return {"step": 1, "extra_state": extra_state, "scheduler": scheduler, "skipped_updates_total": 0,
            "updates_applied": 1, "layout": layout, "optimizer_saved": False}  # fmt: skip


def _saver(rank: int, world: int, tmp: str) -> dict:
    """Rank function: save step_000001 (no update) and step_000002 (after one), then the actor cases."""
    from dapo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from dapo_megatron.parallel.topology import Topology
    from tests import actor_cases as C

    C.start()
    try:
        ckpts = os.path.join(tmp, "ckpts")
        os.makedirs(ckpts)
        actor = C.make_actor(Topology(world_size=1))
        save_checkpoint(actor, os.path.join(ckpts, "step_000001"), step=1, extra_state={"tag": 1})
        batch = C.make_batch()
        actor.train_step(C.with_old_logprobs(batch, actor.compute_logprobs(batch, temperature=1.0)), temperature=1.0)
        step2 = os.path.join(ckpts, "step_000002")
        save_checkpoint(actor, step2, step=2, extra_state={"tag": 2})
        out = {}
        # An old-format meta.pt whose pickled extra_state runs code (its outer dict is plain data).
        evil = os.path.join(tmp, "evil_extra")
        shutil.copytree(step2, evil)
        for name in ("meta.json", "meta.pt"):
            if os.path.exists(os.path.join(evil, name)):
                os.remove(os.path.join(evil, name))
        extra = pickle.dumps(Touch(os.path.join(tmp, "marker_extra")))
        torch.save(_legacy_meta(extra, actor.scheduler.state_dict()), os.path.join(evil, "meta.pt"))
        out["extra"] = _try_load(load_checkpoint, actor, evil)
        # A pickled RNG file next to the real ones: never read.
        evil = os.path.join(tmp, "evil_rng")
        shutil.copytree(step2, evil)
        torch.save(Touch(os.path.join(tmp, "marker_rng")), os.path.join(evil, "rng", "rank_0.pt"))
        out["rng"] = _try_load(load_checkpoint, actor, evil)
        C.teardown()
        return out
    finally:
        C.finish()


def _try_load(load, actor, path: str) -> str:
    try:
        return f"loaded step {load(actor, path)[0]}"
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple:
    from tests.distributed_harness import run_distributed

    tmp = tmp_path_factory.mktemp("ckpt_safety")
    return tmp, run_distributed(_saver, 1, str(tmp), timeout_s=600)[0]


def _copy(saved, name: str, dest: Path) -> Path:
    shutil.copytree(saved[0] / "ckpts" / name, dest)
    return dest


def _record_sizes(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {rel: (folder / rel).stat().st_size for rel in meta["files"]}
    (folder / "meta.json").write_text(json.dumps(meta))


def _largest_distcp(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- item 1: data only
def test_crafted_meta_pt_is_refused_and_runs_no_code(tmp_path):
    """A legacy ``meta.pt`` holding a code-running object: refused by name, marker never created."""
    from dapo_megatron.megatron.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"step": 1, "payload": Touch(str(marker))}, folder / "meta.pt")
    for model_only in (False, True):
        with pytest.raises(CheckpointError, match="meta.pt"):
            load_checkpoint(None, str(folder), model_only=model_only)
    assert not marker.exists()


def test_pickled_extra_state_of_an_old_checkpoint_is_not_unpickled(saved):
    tmp, out = saved
    assert out["extra"].startswith("CheckpointError") and "meta.pt" in out["extra"], out["extra"]
    assert not (tmp / "marker_extra").exists()


def test_a_pickled_rng_file_is_never_read_and_the_checkpoint_still_loads(saved):
    tmp, out = saved
    assert out["rng"] == "loaded step 2", out["rng"]
    assert not (tmp / "marker_rng").exists()


def test_saved_checkpoint_holds_no_pickle_of_ours(saved):
    """meta.json is JSON with the step and extra_state; RNG files are safetensors."""
    folder = saved[0] / "ckpts" / "step_000002"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 2 and meta["extra_state"] == {"tag": 2}
    assert not (folder / "meta.pt").exists()
    assert sorted(p.name for p in (folder / "rng").iterdir()) == ["rank_0.safetensors"]


def test_crafted_torch_metadata_is_refused_before_megatron_unpickles_it(saved, tmp_path):
    """torch's ``.metadata`` is read with plain pickle by megatron: we scan it with an allowlist first."""
    from dapo_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    folder = _copy(saved, "step_000002", tmp_path / "ck")
    marker = tmp_path / "marker"
    (folder / ".metadata").write_bytes(pickle.dumps(Touch(str(marker))))
    _record_sizes(folder)  # a crafted checkpoint's meta.json agrees with its files
    with pytest.raises(CheckpointError, match=r"\.metadata.*system"):
        verify_checkpoint(str(folder))
    done = _export(folder, tmp_path)
    assert done.returncode == 2 and ".metadata" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not marker.exists()


def test_crafted_common_pt_is_refused(saved, tmp_path):
    from dapo_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    folder = _copy(saved, "step_000002", tmp_path / "ck")
    marker = tmp_path / "marker"
    torch.save({"x": Touch(str(marker))}, folder / "common.pt")
    _record_sizes(folder)
    with pytest.raises(CheckpointError, match="common.pt"):
        verify_checkpoint(str(folder))
    assert not marker.exists()


def test_rng_state_round_trips_through_tensors():
    """python ``random``, numpy and torch RNG states survive the safetensors file bit for bit."""
    import random

    import numpy as np

    from dapo_megatron.megatron.ckpt_data import read_rng_file, write_rng_file

    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next, part of the state
    np.random.seed(4)
    np.random.standard_normal()  # leaves numpy's cached gaussian
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}}  # fmt: skip
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rng_{os.getpid()}.safetensors")
    try:
        write_rng_file(path, state)
        back = read_rng_file(path)
    finally:
        os.remove(path)
    assert back["python"] == state["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["numpy"], state["numpy"]))  # fmt: skip
    assert torch.equal(back["torch"], state["torch"]) and back["cuda"] is None
    assert torch.equal(back["tracker"]["model-parallel-rng"], state["tracker"]["model-parallel-rng"])


# ----------------------------------------------------------------------------- item 13: broken files
def test_save_records_every_file_and_its_size(saved):
    folder = saved[0] / "ckpts" / "step_000002"
    files = json.loads((folder / "meta.json").read_text())["files"]
    on_disk = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    on_disk.pop("meta.json")
    assert files == on_disk
    assert "common.pt" in files and any(f.endswith(".distcp") for f in files) and "rng/rank_0.safetensors" in files


def test_truncated_distcp_is_named_with_expected_and_found_size(saved, tmp_path):
    from dapo_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    folder = _copy(saved, "step_000002", tmp_path / "ck")
    bad = _largest_distcp(folder)
    size = bad.stat().st_size
    os.truncate(bad, size // 2)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(str(folder))
    msg = str(e.value)
    assert str(folder) in msg and bad.name in msg and f"{size} bytes" in msg and f"{size // 2}" in msg, msg


def test_missing_common_pt_is_named(saved, tmp_path):
    from dapo_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    folder = _copy(saved, "step_000002", tmp_path / "ck")
    (folder / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"common\.pt.*missing"):
        verify_checkpoint(str(folder))


def test_truncated_distcp_without_our_manifest_is_still_named(saved, tmp_path):
    """A converted checkpoint has no meta.json: torch's ``.metadata`` gives each file's extent."""
    from dapo_megatron.megatron.checkpoint import CheckpointError, verify_checkpoint

    folder = _copy(saved, "step_000002", tmp_path / "ck")
    (folder / "meta.json").unlink()
    bad = _largest_distcp(folder)
    os.truncate(bad, 10)
    with pytest.raises(CheckpointError, match=rf"{bad.name}.*found 10 bytes"):
        verify_checkpoint(str(folder))


def test_latest_checkpoint_skips_a_broken_newest_one(saved, tmp_path):
    from dapo_megatron.megatron.checkpoint import latest_checkpoint

    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0] / "ckpts", root)
    assert (root / "latest").read_text() == "step_000002"
    (root / "step_000002" / "common.pt").unlink()
    skipped: list = []
    assert latest_checkpoint(str(root), report=skipped.append) == str(root / "step_000001")
    assert len(skipped) == 1 and "step_000002" in skipped[0] and "common.pt" in skipped[0], skipped


def test_no_intact_checkpoint_is_a_named_error(saved, tmp_path):
    from dapo_megatron.megatron.checkpoint import CheckpointError, latest_checkpoint

    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0] / "ckpts", root)
    for name in ("step_000001", "step_000002"):
        os.truncate(_largest_distcp(root / name), 0)
    with pytest.raises(CheckpointError, match=rf"no intact checkpoint in {root}"):
        latest_checkpoint(str(root))


def _export(ckpt: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    from tests.actor_cases import TINY_HF

    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(TINY_HF))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [*BIN, "export", "--ckpt", str(ckpt), "--hf-dir", str(hf), "--out", str(tmp_path / "out"), "--no-progress"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["truncate_distcp", "remove_distcp", "remove_common"])
def test_export_of_a_broken_checkpoint_is_one_named_line(saved, tmp_path, damage):
    folder = _copy(saved, "step_000002", tmp_path / "ck")
    bad = folder / "common.pt" if damage == "remove_common" else _largest_distcp(folder)
    if damage == "truncate_distcp":
        os.truncate(bad, 7)
    else:
        bad.unlink()
    done = _export(folder, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert str(folder) in lines[-1] and bad.name in lines[-1] and not (tmp_path / "out").exists()


def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(tmp_path):
    """``train`` resuming a run whose newest checkpoint lost bytes: resumes from the one before."""
    from dapo_megatron.observability.sinks import read_metrics
    from tests.cli_runs import TINY, cli_env, write_demo_assets

    assets = write_demo_assets(tmp_path / "assets")
    run = tmp_path / "run"
    args = [*BIN, "train", "--config", TINY, f"run.dir={run}", "run.eval_every=0", "train.ppo_mini_batch_size=4"]
    first = subprocess.run([*args, "train.total_steps=2"], env=cli_env(assets), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    broken = run / "checkpoints" / "step_000002"
    os.truncate(_largest_distcp(broken), 100)
    again = subprocess.run([*args, "train.total_steps=3"], env=cli_env(assets), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stderr.splitlines() if line.startswith("resume: skipping checkpoint")]
    assert len(skipped) == 1 and str(broken) in skipped[0] and "expected" in skipped[0], again.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2, 3]  # step 2 redone once, from step 1
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"

"""The config tree: dotted overrides, validation messages, YAML round trip, atomic dump, the CLI."""

import os
import pathlib
import subprocess
import sys

import pytest

import dapo_megatron
from dapo_megatron import config_io
from dapo_megatron.config import Config, ConfigError
from dapo_megatron.config_io import dump_config, load_config, to_yaml

REPO_ROOT = pathlib.Path(dapo_megatron.__file__).resolve().parent.parent


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.algo.clip_ratio_low, cfg.algo.clip_ratio_high) == (0.2, 0.28)
    assert cfg.algo.loss_agg_mode == "token-mean"
    assert (cfg.rollout.max_response_len, cfg.algo.overlong_buffer.len) == (20480, 4096)


def test_dotted_overrides_are_typed_by_yaml():
    cfg = load_config(
        None,
        [
            "algo.clip_ratio_high=0.3",
            "algo.clip_ratio_c=3",  # an int in YAML, stored as a float
            "algo.filter_groups.enable=false",
            "algo.filter_groups.on_exhausted=pad",
            "rollout.temperature=0.8",
            "rollout.max_response_len=8192",
            "algo.overlong_buffer.len=1024",
            "data.train_files=[a.parquet, b.parquet]",
            "data.eval_files=aime.parquet",  # a single string becomes a one-element tuple
        ],
    )
    assert cfg.algo.clip_ratio_high == 0.3
    assert cfg.algo.clip_ratio_c == 3.0 and isinstance(cfg.algo.clip_ratio_c, float)
    assert cfg.algo.filter_groups.enable is False
    assert cfg.algo.filter_groups.on_exhausted == "pad"
    assert cfg.rollout.temperature == 0.8
    assert cfg.rollout.max_response_len == 8192 and cfg.algo.overlong_buffer.len == 1024
    assert cfg.data.train_files == ("a.parquet", "b.parquet")
    assert cfg.data.eval_files == ("aime.parquet",)
    # Later overrides win, and null turns an optional setting off again.
    assert load_config(None, ["algo.clip_ratio_c=3", "algo.clip_ratio_c=null"]).algo.clip_ratio_c is None


def test_overrides_apply_on_top_of_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  clip_ratio_high: 0.25\n  loss_agg_mode: seq-mean-token-mean\nrollout:\n  top_p: 0.7\n")
    cfg = load_config(str(path), ["algo.clip_ratio_high=0.35"])
    assert cfg.algo.clip_ratio_high == 0.35
    assert cfg.algo.loss_agg_mode == "seq-mean-token-mean"
    assert cfg.rollout.top_p == 0.7
    assert cfg.algo.clip_ratio_low == 0.2  # untouched default


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["algo.clip_ratio_hi=0.3"], ["algo.clip_ratio_hi", "unknown key", "known keys", "clip_ratio_high"]),
        (["algoo.x=1"], ["algoo", "unknown key", "top level", "algo, data, demo, eval, model"]),
        (["rollout.max_response_len=abc"], ["rollout.max_response_len", "expected an integer", "'abc'"]),
        (["train.total_steps=true"], ["train.total_steps", "expected an integer"]),
        (["algo.overlong_filter=1"], ["algo.overlong_filter", "expected true or false"]),
        (["algo.clip_ratio_low=-0.1"], ["algo.clip_ratio_low", "[0, 1)", "-0.1"]),
        (["algo.clip_ratio_high=-0.01"], ["algo.clip_ratio_high", ">= 0"]),
        (["algo.clip_ratio_c=1"], ["algo.clip_ratio_c", "> 1"]),
        (["algo.loss_agg_mode=seq-mean"], ["algo.loss_agg_mode", "'seq-mean'", "'token-mean'"]),
        (["rollout.max_response_len=4096"], ["algo.overlong_buffer.len", "4096", "rollout.max_response_len=4096"]),
        (["rollout.max_response_len=2048"], ["algo.overlong_buffer.len", "shorter than"]),
        (["parallel.world_size=6", "parallel.tensor=4"], ["parallel.world_size", "6 ranks", "multiple"]),
        (["parallel.world_size=8", "parallel.tensor=2", "parallel.pipeline=3"], ["parallel.world_size", "2*3*1 = 6"]),
        (["parallel.virtual_pipeline=2"], ["parallel.virtual_pipeline", "parallel.pipeline > 1"]),
        (["model.fp8=e4m3", "model.transformer_impl=local"], ["model.fp8", "Transformer Engine"]),
        (["algo.filter_groups.on_exhausted=retry"], ["algo.filter_groups.on_exhausted", "'error', 'pad'"]),
        (["algo.clip_ratio_high"], ["section.key=value"]),
        (["algo.clip_ratio_high.x=1"], ["algo.clip_ratio_high", "expected a number"]),
        (["algo.clip_ratio_high=0.3", "algo.clip_ratio_high.x=1"], ["'clip_ratio_high' is a value, not a section"]),
    ],
)
def test_validation_errors_name_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_exponent_without_a_dot_is_a_number_and_a_word_is_not():
    assert load_config(None, ["optim.lr=5e-4"]).optim.lr == 5e-4  # YAML 1.1 would read a string
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(None, ["optim.lr=fast"])


def test_disabled_overlong_buffer_may_exceed_the_window():
    cfg = load_config(None, ["rollout.max_response_len=2048", "algo.overlong_buffer.enable=false"])
    assert cfg.algo.overlong_buffer.len == 4096


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(bad))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "algo.clip_ratio_c=10",
            "data.train_files=[x.parquet]",
            "model.fp8=e4m3",
            "model.params_dtype=bfloat16",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "run.name=round-trip",
        ],
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
    assert load_config(str(path)) != Config()


def test_dump_config_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "run" / "config.yaml"  # the folder does not exist yet
    cfg = load_config(None, ["algo.clip_ratio_high=0.31"])
    dump_config(cfg, str(target))
    assert os.listdir(target.parent) == ["config.yaml"]  # no temp file left behind
    assert load_config(str(target)) == cfg
    # A failure while writing leaves the previous file intact and removes the temp file.
    before = target.read_text()

    def broken(_cfg):
        raise OSError("disk full")

    monkeypatch.setattr(config_io, "to_yaml", broken)
    with pytest.raises(OSError, match="disk full"):
        dump_config(Config(), str(target))
    assert os.listdir(target.parent) == ["config.yaml"]
    assert target.read_text() == before


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dapo_megatron", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env=env,
        timeout=120,
    )


def test_cli_config_prints_the_override():
    out = _cli("config", "algo.clip_ratio_high=0.31", "rollout.top_p=0.7")
    assert out.returncode == 0, out.stderr
    assert "clip_ratio_high: 0.31" in out.stdout
    assert "top_p: 0.7" in out.stdout
    assert "clip_ratio_low: 0.2" in out.stdout


def test_cli_config_bad_key_exits_2_with_a_clear_message():
    out = _cli("config", "algo.bogus=1")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "config error" in out.stderr
    assert "algo.bogus: unknown key" in out.stderr
    assert "known keys are" in out.stderr and "clip_ratio_high" in out.stderr
    assert "Traceback" not in out.stderr


def test_env_references_expand_and_unset_ones_name_the_key(monkeypatch):
    monkeypatch.setenv("DAPO_TEST_MODELS", "/models")
    cfg = load_config(None, ["model.hf_path=${DAPO_TEST_MODELS}/Qwen", "data.train_files=['${DAPO_TEST_MODELS}/a']"])
    assert cfg.model.hf_path == "/models/Qwen" and cfg.data.train_files == ("/models/a",)
    monkeypatch.delenv("DAPO_TEST_MODELS")
    with pytest.raises(
        ConfigError,
        match=r"model.hf_path in the override 'model.hf_path=\$\{DAPO_TEST_MODELS\}/Qwen' "
        r"uses \$\{DAPO_TEST_MODELS\}, which is not set: export DAPO_TEST_MODELS=<value>",
    ):
        load_config(None, ["model.hf_path=${DAPO_TEST_MODELS}/Qwen"])
    with pytest.raises(ConfigError, match=r"override 'data.train_files=\[\$\{X\}\]': the value is not valid YAML"):
        load_config(None, ["data.train_files=[${X}]"])


@pytest.mark.parametrize(
    "recipe, unset, key",
    [
        ("dapo_qwen2.5_7b.yaml", "MODELS", "model.hf_path"),
        ("dapo_qwen2.5_32b.yaml", "CKPT", "model.load"),
        ("dapo_qwen2.5_7b.yaml", "DATA", "data.train_files"),
    ],
)
def test_cli_plan_names_an_unset_recipe_variable_its_key_file_and_remedy(recipe, unset, key):
    """`dapo-megatron plan` (the first command of every sbatch script) on a recipe whose ${VAR} is
    unset: exit 2, one line, naming the variable, the key, the file and the export that fixes it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "CKPT", "DATA")}
    env.update({name: f"/{name.lower()}" for name in ("MODELS", "CKPT", "DATA") if name != unset})
    env["PYTHONPATH"] = str(REPO_ROOT)
    path = f"examples/{recipe}"
    out = subprocess.run([sys.executable, "-m", "dapo_megatron", "plan", "--config", path],
                         capture_output=True, text=True, cwd=str(REPO_ROOT), env=env, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    line = out.stderr.strip()
    assert f"{key} in {path} uses ${{{unset}}}, which is not set: export {unset}=<folder" in line
    assert f"no slurm/*.sbatch sets {unset}" in line and "slurm/common.sh" in line
    assert f"${{{unset}}}" in (REPO_ROOT / "slurm" / "common.sh").read_text()  # the file the remedy points at
    assert "Traceback" not in line


@pytest.mark.parametrize("recipe", ["dapo_qwen2.5_7b.yaml", "dapo_qwen2.5_32b.yaml"])
def test_paper_recipes_resolve_with_the_paper_hyper_parameters(monkeypatch, recipe):
    for name in ("MODELS", "CKPT", "DATA"):
        monkeypatch.setenv(name, f"/{name.lower()}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "examples", recipe))
    assert (cfg.algo.clip_ratio_low, cfg.algo.clip_ratio_high, cfg.algo.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (512, 16)
    assert cfg.rollout.max_response_len == 20480 and cfg.algo.overlong_buffer.len == 4096
    assert cfg.optim.lr == 1e-6 and cfg.rollout.prompts_per_step // cfg.train.ppo_mini_batch_size == 16


def test_routing_replay_needs_an_engine_that_returns_routes():
    from dapo_megatron.config import AlgoConfig

    assert AlgoConfig(routing_replay="rollout").routing_replay == "rollout"
    with pytest.raises(ConfigError, match="allowed values"):
        AlgoConfig(routing_replay="engine")
    for engine in ("embedded", "sglang"):
        load_config(None, ["algo.routing_replay=rollout", f"rollout.engine={engine}"])
    with pytest.raises(ConfigError, match=r"algo\.routing_replay.*rollout\.engine is 'vllm'"):
        load_config(None, ["algo.routing_replay=rollout", "rollout.engine=vllm"])
    # training on dumped steps reads the routes from the dump, whatever the engine
    load_config(None, ["algo.routing_replay=rollout", "rollout.engine=vllm", "run.replay_rollouts=dumped"])

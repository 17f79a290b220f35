"""Config values that must be finite, the expert-parallel layout check, and typed list items.

Every float field of the tree is tried with inf, -inf and nan through the real override path, so a
float field added later is covered without editing this file.
"""

import dataclasses
import math
import typing

import pytest

from dapo_megatron.config import Config, ConfigError, DataConfig, OptimConfig, ParallelConfig
from dapo_megatron.config_io import load_config


def _float_keys(cls: type = Config, prefix: str = "") -> list:
    """Dotted keys of every float (or optional float) field under ``cls``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_the_tree_has_the_float_fields_the_issue_names():
    for key in ("optim.lr", "algo.clip_ratio_high", "algo.overlong_buffer.penalty_factor", "reward.timeout_s"):
        assert key in FLOAT_KEYS


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_values(key, text):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={text}"])
    message = str(info.value)
    assert message.startswith(f"{key}:") and "finite" in message, message


def test_non_finite_values_in_a_yaml_file_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite number, got inf"):
        load_config(str(path))


def test_a_tree_built_in_code_is_checked_too():
    # Sections built in Python skip the YAML coercion; the root still walks every float.
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite number, got inf"):
        Config(optim=OptimConfig(lr=math.inf))


def test_huge_but_finite_values_are_still_accepted():
    assert load_config(None, ["optim.lr=1e30"]).optim.lr == 1e30


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["parallel.world_size=4", "parallel.expert=3"], ["parallel.expert", "3", "data-parallel", "4"]),
        (["parallel.world_size=8", "parallel.tensor=2", "parallel.expert=8"], ["parallel.expert", "8/2 = 4"]),
        (["parallel.world_size=2", "parallel.expert=4"], ["parallel.expert", "4", "2"]),
    ],
)
def test_expert_parallelism_must_divide_the_data_parallel_degree(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith("parallel.expert:"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_expert_layouts_that_fit_are_accepted():
    assert ParallelConfig(world_size=8, tensor=2, expert=2).expert == 2
    assert ParallelConfig(world_size=8, expert=8).expert == 8
    assert ParallelConfig(world_size=0, expert=3).expert == 3  # world from the launcher: checked at start-up


@pytest.mark.parametrize("key", ["data.train_files", "data.eval_files"])
@pytest.mark.parametrize(
    "items,index,bad",
    [("[a.parquet, 1]", 1, "1"), ("[[a.parquet]]", 0, "['a.parquet']"), ("[a.parquet, null]", 1, "None"),
     ("[true]", 0, "True")],
)  # fmt: skip
def test_file_list_items_must_be_strings(key, items, index, bad):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={items}"])
    message = str(info.value)
    assert message.startswith(f"{key}[{index}]:") and "expected a string" in message and bad in message, message


def test_file_lists_built_in_code_are_checked():
    with pytest.raises(ConfigError, match=r"^data\.train_files\[0\]: expected a string .*, got int 3"):
        DataConfig(train_files=(3,))
    assert DataConfig(train_files=("a.parquet",), eval_files=("b.jsonl",)).train_files == ("a.parquet",)

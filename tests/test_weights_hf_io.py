"""HF folder reading (streaming, clear errors) and atomic sharded writing."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dapo_megatron.weights.hf_io import (
    INDEX_FILE,
    HFCheckpointError,
    HFReader,
    atomic_output_dir,
    write_hf_folder,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [(f"t{i}", torch.randn(10, 10, generator=g)) for i in range(5)]  # 400 B each


def _write(folder, max_shard_bytes):
    return write_hf_folder(folder, iter(_tensors()), config={"model_type": "qwen2"}, max_shard_bytes=max_shard_bytes)


def test_sharded_write_and_streaming_read_round_trip(tmp_path):
    out = tmp_path / "m"
    weight_map = _write(out, max_shard_bytes=900)
    # 400+400 | 400+400 | 400: three shards named HF-style, with an index.
    assert sorted(set(weight_map.values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 2000
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with HFReader(out) as r:
        assert r.config == {"model_type": "qwen2"}
        assert r.names() == [n for n, _ in _tensors()]
        assert r.shape("t3") == (10, 10) and r.dtype("t3") == torch.float32
        for name, t in _tensors():
            assert torch.equal(r.get(name), t)
        assert r.get("t0", torch.bfloat16).dtype == torch.bfloat16


def test_single_shard_has_no_index(tmp_path):
    _write(tmp_path / "m", max_shard_bytes=10**6)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


def test_errors_name_the_file_and_tensor(tmp_path):
    out = tmp_path / "m"
    _write(out, max_shard_bytes=900)
    with HFReader(out) as r:
        with pytest.raises(HFCheckpointError, match="tensor 'nope' not found"):
            r.get("nope")
        with pytest.raises(
            HFCheckpointError, match=r"model-00002-of-00003.safetensors: tensor 't2' has shape \[10, 10\]"
        ):
            r.check_shapes({"t2": (10, 11)})
    shard = out / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match="model-00002-of-00003.safetensors: unreadable safetensors file"):
        HFReader(out)
    shard.unlink()
    with pytest.raises(HFCheckpointError, match="shard file\\(s\\) missing .*model-00002-of-00003.safetensors"):
        HFReader(out)
    (out / "config.json").unlink()
    with pytest.raises(HFCheckpointError, match="config.json not found"):
        HFReader(out)


def test_index_listing_a_tensor_the_shard_lacks(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2)}, str(folder / "s1.safetensors"))
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(HFCheckpointError, match="s1.safetensors: index lists tensors the file lacks: \\['b'\\]"):
        HFReader(folder)


def test_failed_write_leaves_no_folder(tmp_path):
    def broken():
        yield "a", torch.zeros(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_hf_folder(tmp_path / "m", broken(), config={})
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        write_hf_folder(tmp_path / "m", iter([("a", torch.zeros(1)), ("a", torch.zeros(1))]), config={})
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_refuses_existing_output(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"), atomic_output_dir(tmp_path / "m"):
        pass
    assert (tmp_path / "m" / "keep").read_text() == "x"

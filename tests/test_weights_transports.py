"""Bucketing, checksums and the three transports (CUDA IPC only with a GPU)."""

import pytest
import torch
from distributed_harness import free_port, run_distributed
from weights_cases import broadcast_case, from_bytes, sample_weights

from dapo_megatron.weights.reshard import bucketize, layer_owner
from dapo_megatron.weights.transports import (
    CudaIpcReceiver,
    CudaIpcSender,
    InProcessTransport,
    TensorMeta,
    metas_of,
    tensor_checksum,
)


def _nbytes(bucket):
    return sum(t.numel() * t.element_size() for _, t in bucket)


def test_bucketize_keeps_order_and_bound():
    weights = sample_weights()
    buckets = list(bucketize(weights, max_bytes=600))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in weights]
    # By hand: 320+128+32 = 480 | 800 (alone, over the bound) | 16+8
    assert [[n for n, _ in b] for b in buckets] == [
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"],
        ["big"],
        ["model.norm.weight", "step"],
    ]
    assert all(_nbytes(b) <= 600 for b in buckets if len(b) > 1)
    with pytest.raises(ValueError):
        list(bucketize(weights, 0))


def test_layer_owner_matches_megatron_interleaving():
    assert layer_owner(4, 2, 1) == [(0, 0), (0, 0), (1, 0), (1, 0)]
    # 8 layers, pp 2, vpp 2: chunks of 2; stage0 chunk0 = 0,1; stage1 chunk0 = 2,3; stage0 chunk1 = 4,5 ...
    assert layer_owner(8, 2, 2) == [(0, 0), (0, 0), (1, 0), (1, 0), (0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="equal chunks"):
        layer_owner(6, 4, 1)


def test_checksum_sees_names_dtypes_shapes_and_bytes():
    w = sample_weights()
    base = tensor_checksum(w)
    assert base == tensor_checksum([(n, t.clone()) for n, t in w])
    assert base != tensor_checksum([("x" + w[0][0], w[0][1])] + w[1:])
    assert base != tensor_checksum([(w[0][0], w[0][1].double())] + w[1:])
    assert base != tensor_checksum([(w[0][0], w[0][1].reshape(8, 10))] + w[1:])
    flipped = w[0][1].clone()
    flipped[3, 3] += 1
    assert base != tensor_checksum([(w[0][0], flipped)] + w[1:])
    assert metas_of(w[:1]) == [TensorMeta("model.embed_tokens.weight", "float32", (10, 8))]


def test_in_process_transport_passes_version():
    calls = []
    InProcessTransport(lambda named, version: calls.append((named, version))).send_bucket(sample_weights(), 4)
    assert calls[0][1] == 4 and [n for n, _ in calls[0][0]] == [n for n, _ in sample_weights()]


@pytest.mark.multiproc
def test_broadcast_transport_delivers_identical_versioned_buckets():
    results = run_distributed(broadcast_case, 2, free_port(), free_port(), timeout_s=120)
    sender, receiver = (from_bytes(r) for r in results)
    assert receiver["versions"] == [7, 8, 9]
    assert receiver["checksums"] == sender["checksums"]
    got = receiver["received"]
    want = sample_weights()
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert receiver["again_equal"]


def test_cuda_ipc_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CudaIpcSender needs CUDA"):
        CudaIpcSender(lambda payload, version: None)
    with pytest.raises(RuntimeError, match="CudaIpcReceiver needs CUDA"):
        CudaIpcReceiver()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_round_trip_in_one_process():
    receiver = CudaIpcReceiver()
    got = {}

    def deliver(payload, version):
        got["bucket"], got["version"] = receiver.load(payload)

    weights = [(n, t.cuda()) for n, t in sample_weights()]
    CudaIpcSender(deliver).send_bucket(weights, 11)
    assert got["version"] == 11
    assert tensor_checksum(got["bucket"]) == tensor_checksum(weights)

"""The colocated per-stage sync's CUDA-IPC leg on a GPU (marker ``gpu``; skips without CUDA).

Two trainer ranks at PP=2 (gloo default group, both stages' models on the one visible GPU) each run
:func:`iter_stage_hf_weights` and serialise their own buckets exactly as a stage leader's
``update_weights_from_tensor`` POST carries them (:func:`sglang_api.serialize_named_tensors`: CUDA IPC
handles, no copy). A separate consumer process - the colocated engine's side - opens every payload
(with SGLang's ``MultiprocessingSerializer`` when that package is importable, else the same
``ForkingPickler`` load it performs) and hashes what it reads from the sender's GPU memory.

Proves: every bucket a stage sends arrives bit for bit through CUDA IPC while the sender keeps it
alive, and the two stages together send every HF tensor of the model exactly once (stage 0 the
embedding and its layers, stage 1 its layers and the final norm/head). The per-node variant: each rank
is a sender holding the whole model (its own stage gathered, the other relayed to it on the GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HF = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
      "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}  # fmt: skip

CONSUMER = """
import base64, sys
from multiprocessing.reduction import ForkingPickler
from dapo_megatron.weights.transports import tensor_checksum
try:
    from sglang.srt.utils import MultiprocessingSerializer
    load = MultiprocessingSerializer.deserialize
except ImportError:
    load = lambda s: ForkingPickler.loads(base64.b64decode(s))
for line in sys.stdin:
    print(tensor_checksum(load(line.strip())), flush=True)
"""


def _stage_case(rank: int, world: int, per_node: bool = False) -> dict:
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.controller.node_senders import NodeRole
    from dapo_megatron.megatron.model import build_model_chunks, model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology
    from dapo_megatron.rollout.sglang_api import serialize_named_tensors
    from dapo_megatron.weights.node_gather import iter_node_buckets
    from dapo_megatron.weights.reshard import bucketize
    from dapo_megatron.weights.stage_gather import iter_stage_hf_weights
    from dapo_megatron.weights.transports import tensor_checksum

    torch.cuda.set_device(0)
    init_distributed(backend="gloo")
    topology = Topology(world, tp=1, pp=2, vpp=1)
    init_model_parallel(topology, seed=7)
    spec = model_spec_from_hf(HF)
    chunks = build_model_chunks(spec, topology, ModelConfig(params_dtype="bfloat16", transformer_impl="local"))
    if per_node:  # both ranks are senders on nodes without the other stage: relay over the pipeline group
        role = NodeRole(gathers=True, relays=True, emits=True)
        buckets = list(iter_node_buckets(chunks, spec, topology, role, 256 << 10))
    else:
        buckets = list(bucketize(iter_stage_hf_weights(chunks, spec, topology), 256 << 10))
    assert buckets and all(t.is_cuda for b in buckets for _, t in b)
    payloads = [serialize_named_tensors(b) for b in buckets]  # buckets stay alive until the consumer is done
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", CONSUMER], input="\n".join(payloads) + "\n", text=True,
                          capture_output=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "names": [n for b in buckets for n, _ in b],
        "sent": [tensor_checksum(b) for b in buckets],
        "received": done.stdout.split(),
    }


def test_each_stage_sends_its_buckets_through_cuda_ipc():
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.weights.mapping import hf_shapes
    from tests.distributed_harness import run_distributed

    stage0, stage1 = run_distributed(_stage_case, 2, timeout_s=600)
    for res in (stage0, stage1):
        assert res["received"] == res["sent"]  # bit for bit, read from the sender's GPU memory
    assert "model.embed_tokens.weight" in stage0["names"] and "lm_head.weight" in stage1["names"]
    assert sorted(stage0["names"] + stage1["names"]) == sorted(hf_shapes(model_spec_from_hf(HF)))


def test_per_node_senders_relay_the_other_stage_and_send_it_through_cuda_ipc():
    """The per-node path at PP2: each rank receives the other stage over the pipeline group (gloo on
    CUDA tensors here; NCCL in a run) and sends the whole model through CUDA IPC."""
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.weights.mapping import hf_shapes
    from tests.distributed_harness import run_distributed

    everything = sorted(hf_shapes(model_spec_from_hf(HF)))
    for res in run_distributed(_stage_case, 2, True, timeout_s=600):
        assert res["received"] == res["sent"]
        assert sorted(res["names"]) == everything

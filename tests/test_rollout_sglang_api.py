"""SGLang payload shapes against fixtures written from the pinned SGLang / sglang-router sources."""

import json
import pathlib

import pytest
import torch

from dapo_megatron.rollout import sglang_api as api
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.sglang import _buckets
from dapo_megatron.rollout.sglang_server import ServerOptions, launch_sglang_server, server_env
from dapo_megatron.weights.transports import TensorMeta

FIX = pathlib.Path(__file__).parent / "rollout_fixtures"
REQ = json.loads((FIX / "sglang_requests.json").read_text())
RESP = json.loads((FIX / "sglang_responses.json").read_text())


def test_pinned_version():
    assert api.SGLANG_VERSION == "0.5.23" and api.SGLANG_ROUTER_VERSION == "0.3.2"


def test_generate_request_exact():
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=20, max_new_tokens=8, stop_token_ids=(2,), seed=7)
    assert api.generate_request([1, 2, 3], params, rid="req-1") == REQ["generate"]
    routed = api.generate_request([1], params, return_routed_experts=True)
    assert routed["return_routed_experts"] is True and "return_routed_experts" not in REQ["generate"]


def test_generate_request_without_seed_or_stops_omits_them():
    sp = api.generate_request([1], SamplingParams())["sampling_params"]
    assert "sampling_seed" not in sp and "stop_token_ids" not in sp


def test_control_payloads_exact():
    assert api.abort_request(abort_all=True) == REQ["abort_all"]
    assert api.abort_request(rid="req-1") == REQ["abort_one"]
    assert api.pause_generation() == REQ["pause_generation"]
    assert api.continue_generation() == REQ["continue_generation"]
    assert api.release_memory_occupation() == REQ["release_memory_occupation"]
    assert api.resume_memory_occupation(["weights"]) == REQ["resume_memory_occupation"]
    assert api.router_add_worker("http://10.0.0.2:30010") == REQ["router_add_worker"]
    with pytest.raises(ValueError):
        api.pause_generation("freeze")


def test_weight_payloads_exact():
    assert (
        api.init_weights_update_group(master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=3)
        == REQ["init_weights_update_group"]
    )
    metas = [
        TensorMeta("model.embed_tokens.weight", "bfloat16", (128, 64)),
        TensorMeta("model.norm.weight", "float32", (64,)),
    ]
    assert api.update_weights_from_distributed(metas, version=12) == REQ["update_weights_from_distributed"]


def test_update_weight_session_payloads_exact():
    assert api.begin_weight_update() == REQ["begin_weight_update"]
    assert api.end_weight_update() == REQ["end_weight_update"]
    assert api.update_weight_version(12) == REQ["update_weight_version"]
    assert api.update_weights_from_tensor("<serialized>", version=3, tp_size=2) == REQ["update_weights_from_tensor"]


def test_flattened_bucket_layout_and_alignment():
    named = [
        ("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("b", torch.tensor([1, 2], dtype=torch.bfloat16)),
    ]
    flat = api.flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() == 6 * 4 + 2 * 2
    # the raw bytes of each tensor, in order: what SGLang's FlattenedTensorBucket.empty() lays out
    assert torch.equal(flat[:24].view(torch.float32).reshape(2, 3), named[0][1])
    assert torch.equal(flat[24:].view(torch.bfloat16), named[1][1])
    with pytest.raises(ValueError, match="not aligned"):  # a float32 after one bf16 element: offset 2
        api.flatten_bucket([("odd", torch.ones(1, dtype=torch.bfloat16)), ("f", torch.ones(1))])


def test_serialized_tensors_are_shared_not_copied():
    import base64
    from multiprocessing.reduction import ForkingPickler

    t = torch.arange(1000, dtype=torch.float32)
    payload = api.serialize_named_tensors([("w", t)])
    assert len(payload) < 1000  # the 4 kB of data travel through shared memory, not the payload
    [(name, back)] = ForkingPickler.loads(base64.b64decode(payload))
    assert name == "w" and torch.equal(back, t)


def test_parse_generate_single_stop():
    [c] = api.parse_generate_response(RESP["generate_single_stop"], 1)
    assert c.token_ids == [17, 2] and c.logprobs == [-0.25, -1.5] and c.finish_reason == "stop"
    assert c.weight_version == 5


def test_parse_generate_length_and_abort():
    a, b = api.parse_generate_response(RESP["generate_n2_length_and_abort"], 2)
    assert (a.finish_reason, a.token_ids, a.logprobs) == ("length", [4, 5, 6], [-1.0, -2.0, -3.0])
    assert (b.finish_reason, b.token_ids) == ("abort", [9])
    assert a.weight_version == 0  # SGLang's "default" version string


def test_parse_errors():
    with pytest.raises(api.SGLangRequestError, match="context length"):
        api.parse_generate_response(RESP["generate_error_400"], 1)
    with pytest.raises(api.SGLangRequestError, match="output_token_logprobs"):
        api.parse_generate_response(RESP["generate_missing_logprobs"], 1)
    with pytest.raises(api.SGLangRequestError, match="expected 3 completions"):
        api.parse_generate_response(RESP["generate_n2_length_and_abort"], 3)
    bad = json.loads(json.dumps(RESP["generate_single_stop"]))
    bad["output_ids"] = [17, 3]
    with pytest.raises(api.SGLangRequestError, match="do not match"):
        api.parse_generate_response(bad, 1)


def test_parse_success_and_router_bodies():
    assert "Succeeded" in api.parse_success(RESP["update_weights_ok"], "update")
    assert "Succeeded" in api.parse_success(RESP["init_weights_update_group_ok"], "init")
    with pytest.raises(api.SGLangRequestError, match="shape mismatch"):
        api.parse_success(RESP["update_weights_failed"], "update")
    assert api.parse_router_add_worker(RESP["router_add_worker_202"]) == "a486d365-2db1-4ebe-9151-d3e1fccef489"
    workers = api.parse_router_workers(RESP["router_workers"])
    assert workers["http://127.0.0.1:56469"]["is_healthy"] is True


def test_completion_keeps_version_ranges_and_routed_experts():
    item = json.loads(json.dumps(RESP["generate_single_stop"]))
    item["meta_info"]["weight_versions"] = [
        {"version": "4", "start": 0, "end": 1},
        {"version": "5", "start": 1, "end": 2},
    ]
    item["meta_info"]["routed_experts"] = [[0, 3], [1, 2]]
    [c] = api.parse_generate_response(item, 1)
    assert c.meta["weight_versions"][1]["version"] == "5" and c.meta["routed_experts"] == [[0, 3], [1, 2]]


def test_launch_command_and_buckets():
    opts = ServerOptions("/models/q", host="10.0.0.5", port=30010, tp=2, mem_fraction_static=0.6,
                         enable_memory_saver=True, api_key="k")  # fmt: skip
    argv = launch_sglang_server(opts)
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    for flag, value in (("--model-path", "/models/q"), ("--tp-size", "2"), ("--port", "30010"),
                        ("--host", "10.0.0.5"), ("--mem-fraction-static", "0.6"), ("--api-key", "k")):  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-memory-saver" in argv and "--device" not in argv
    cpu = launch_sglang_server(ServerOptions("/m", device="cpu", enable_memory_saver=True))
    assert cpu[cpu.index("--device") + 1] == "cpu" and "--enable-memory-saver" not in cpu  # CUDA-only saver
    assert cpu[cpu.index("--max-total-tokens") + 1] == "16384"
    env = server_env("cpu", base={"PYTHONPATH": "/x", "RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["PYTHONPATH"].endswith(":/x")
    assert not {"RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & set(env)  # a trainer rank's world is not the server's
    assert "SGLANG_USE_CPU_ENGINE" not in server_env("cuda", base={})
    for device in ("cpu", "cuda"):  # the router's probe must not need a token (test_sglang_fleet.py shows why)
        assert server_env(device, base={})["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "false"
    named = [(str(i), torch.zeros(10)) for i in range(5)]  # 40 bytes each
    assert [[n for n, _ in b] for b in _buckets(named, 100)] == [["0", "1"], ["2", "3"], ["4"]]
    assert [[n for n, _ in b] for b in _buckets([("big", torch.zeros(100))], 10)] == [["big"]]

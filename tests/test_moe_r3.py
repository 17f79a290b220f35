"""Routing replay (R3) end to end: the embedded engine returns the experts of every token it read,
the samples, train batch, micro-batches and DP wire carry them, and the actor's forwards replay them.

The gap figures (max |trainer log-prob - engine log-prob| over response tokens) are printed; run
with ``-s`` to see them."""

import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import hf_rollout, make_near_tie_moe, make_tiny_moe
from r3_cases import PROMPTS, engine_rollout, logprobs_case, train_batch
from weights_cases import make_tiny_hf_model

from dapo_megatron.megatron.batching import make_microbatch, pad_microbatch, sequence_lengths
from dapo_megatron.megatron.dispatch import _pack, _unpack, plan_step
from dapo_megatron.rollout.base import Completion, SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.generator import dump_groups, load_groups
from dapo_megatron.rollout.partial import extend, from_group, to_group
from dapo_megatron.types import Sample


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("r3")
    decisive, near_tie, dense = str(root / "decisive"), str(root / "near_tie"), str(root / "dense")
    make_tiny_moe(decisive, seed=0, router_scale=3.0)
    make_near_tie_moe(near_tie, gap=1e-6)
    make_tiny_hf_model(dense, "qwen3_gqa4_tied", layers=2)
    return {"decisive": decisive, "near_tie": near_tie, "dense": dense}


# ----------------------------------------------------------------------------- the engine
def test_engine_returns_the_experts_of_every_token_it_read_and_nothing_else_changes(models):
    engine = EmbeddedEngine.from_pretrained(models["decisive"], max_batch_rows=8, max_seq_len=64)
    params = SamplingParams(n=3, max_new_tokens=10, seed=1, return_routed_experts=True)
    prompt = PROMPTS[0]
    with_routes = engine.generate_sync([prompt, PROMPTS[1]], params)  # two requests batched together
    plain = engine.generate_sync([prompt, PROMPTS[1]], SamplingParams(n=3, max_new_tokens=10, seed=1))
    for got, ref in zip(with_routes, plain):
        assert [(c.token_ids, c.logprobs) for c in got] == [(c.token_ids, c.logprobs) for c in ref]
        assert all("routed_experts" not in c.meta for c in ref)
    for c in with_routes[0]:
        ids = torch.tensor(c.meta["routed_experts"])
        assert ids.shape == (len(prompt) + len(c.token_ids) - 1, 2, 2)  # [read tokens, layers, k]
        # HF's own routing of the whole sequence in one forward, which the engine ran piecewise
        want = hf_rollout(models["decisive"], torch.tensor([prompt + c.token_ids]), torch.float32)[0, :-1]
        assert torch.equal(ids, want), "the engine's routes differ from the model's own"


def test_routes_travel_from_a_worker_process_and_its_refusal_too(models):
    import asyncio

    from dapo_megatron.rollout.embedded_client import EmbeddedWorkerEngine

    kwargs = dict(max_batch_rows=8, max_seq_len=64)
    params = SamplingParams(n=2, max_new_tokens=6, seed=4, return_routed_experts=True)
    local = EmbeddedEngine.from_pretrained(models["decisive"], **kwargs).generate_sync([PROMPTS[2]], params)[0]
    worker = EmbeddedWorkerEngine.from_pretrained(models["decisive"], engine_kwargs=kwargs)
    dense = EmbeddedWorkerEngine.from_pretrained(models["dense"], engine_kwargs=kwargs)
    try:
        remote = asyncio.run(worker.generate(PROMPTS[2], params, timeout_s=120))
        assert [c.meta["routed_experts"] for c in remote] == [c.meta["routed_experts"] for c in local]
        with pytest.raises(ValueError, match="not model_type='qwen3'"):
            asyncio.run(dense.generate(PROMPTS[2], params, timeout_s=120))
    finally:
        worker.close()
        dense.close()


def test_engine_loads_per_expert_checkpoint_names_into_transformers_fused_experts(models):
    from weights_cases import hf_state_dict

    on_disk = hf_state_dict(models["decisive"])  # per-expert names, as weight syncs send them
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in on_disk
    kwargs = dict(max_batch_rows=4, max_seq_len=32)
    synced = EmbeddedEngine(f"{models['decisive']}/config.json", seed=9, **kwargs)
    synced.update_weights_sync(list(on_disk.items()), version=1)
    reference = EmbeddedEngine.from_pretrained(models["decisive"], **kwargs)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in synced.state_dict().items())
    with pytest.raises(ValueError, match="experts.0.gate_proj.weight has shape"):
        synced.update_weights_sync([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(3, 64))], 2)


def test_engine_refuses_routing_for_a_dense_model(models):
    engine = EmbeddedEngine.from_pretrained(models["dense"], max_batch_rows=2, max_seq_len=32)
    with pytest.raises(ValueError, match="model_type='qwen3'.*dense"):
        engine.generate_sync([[5, 6]], SamplingParams(max_new_tokens=2, return_routed_experts=True))


class _RoutelessEngine:
    """An engine that ignores ``return_routed_experts`` (as one without routing capture would)."""

    weight_version = 0

    async def generate(self, prompt_ids, params, *, timeout_s):
        return [Completion([3 + i, 2], [-1.0, -1.0], "stop") for i in range(params.n)]

    async def abort_all(self): ...

    async def health(self):
        return True


def test_the_rollout_refuses_completions_without_routes_when_replay_asked_for_them():
    import asyncio

    from dapo_megatron.rewards.base import RewardResult
    from dapo_megatron.rollout.generator import PromptItem, RoutingNotReturned, StreamingRollout

    def reward(text, truth):
        return RewardResult(1.0 if text == "3" else -1.0, text == "3", text)

    rollout = StreamingRollout(
        [_RoutelessEngine()], reward, tokenizer_decode=lambda ids: str(ids[0]), max_response_len=8,
        sampling=SamplingParams(n=2, max_new_tokens=8, return_routed_experts=True), target_groups=1,
        gen_prompts_per_round=1, max_num_gen_batches=1, max_concurrency=1, request_timeout_s=5,
    )  # fmt: skip
    with pytest.raises(RoutingNotReturned, match="algo.routing_replay=rollout.*engine 0 returned none"):
        asyncio.run(rollout.run(lambda k: [PromptItem(i, [5, 6], "3", {}) for i in range(k)]))


# ----------------------------------------------------------------------------- the carriers
def _routes(n, layers=2, base=0):
    return [[[(base + t + i) % 4, (base + t + i + 1) % 4] for i in range(layers)] for t in range(n)]


def test_partial_segments_join_routes_and_checkpoints_and_dumps_keep_them(tmp_path):
    prompt = [1, 2, 3]
    first = Completion([7, 8], [-1.0, -2.0], "abort", weight_version=1, meta={"routed_experts": _routes(4)})
    # the continuation read prompt + [7, 8]: its routes cover positions 0..(3 + 2 + 3 - 2) = 6
    second = Completion([9, 10, 2], [-1.0] * 3, "stop", weight_version=2, meta={"routed_experts": _routes(7, base=1)})
    joined = extend(extend(None, first, max_response_len=16), second, max_response_len=16)
    assert joined.meta["routed_experts"] == _routes(4) + _routes(7, base=1)[4:]
    assert extend(first, Completion([], [], "abort"), max_response_len=16).meta["routed_experts"] == _routes(4)
    group = to_group(0, prompt, "gt", {}, [joined, None])
    assert group.samples[0].routed_experts == joined.meta["routed_experts"]
    _, parts = from_group(group)
    assert parts[0].meta["routed_experts"] == joined.meta["routed_experts"] and parts[1] is None
    dump_groups([group], str(tmp_path / "g.jsonl"))
    assert load_groups(str(tmp_path / "g.jsonl"))[0].samples[0].routed_experts == joined.meta["routed_experts"]
    with pytest.raises(ValueError, match="routed_experts: routing of 4 tokens, expected 7"):
        Sample(prompt, [9, 10, 2, 5, 6], [0.0] * 5, "stop", routed_experts=_routes(4))


def test_train_batch_microbatches_and_dp_wire_carry_routes_with_distinct_filler():
    from dapo_megatron.types import Group

    samples = [Sample([1, 2], [3, 4, 5], [-0.5] * 3, "stop", reward=1.0, routed_experts=_routes(4, base=2)),
               Sample([1, 2, 3], [4], [-0.5], "stop", reward=0.0, routed_experts=_routes(3, base=3))]  # fmt: skip
    batch = train_batch([Group(0, "", samples)])
    routes = batch.routed_experts
    assert routes.shape == (2, 5, 2, 2)
    assert routes[0, :4].tolist() == _routes(4, base=2) and routes[1, :3].tolist() == _routes(3, base=3)
    assert routes[0, 4].tolist() == [[0, 1], [0, 1]] and routes[1, 3:].tolist() == [[[0, 1], [0, 1]]] * 2
    mb = make_microbatch(batch, [1], sequence_lengths(batch), batch.rollout_logprobs)
    assert torch.equal(mb.routed_experts, routes[1:2, : mb.tokens.shape[1]])
    padded = pad_microbatch(mb, 2, 6)
    assert padded.routed_experts.shape == (2, 6, 2, 2) and padded.routed_experts[1, 5].tolist() == [[0, 1], [0, 1]]
    dummy = make_microbatch(batch, [], sequence_lengths(batch), batch.rollout_logprobs)
    assert dummy.routed_experts.tolist() == [[[[0, 1], [0, 1]]] * 2]
    (shard,) = plan_step(batch, dp_size=1, prompts_per_update=1, micro_batch_size=1)
    meta, payload = _pack(shard, 0, torch.device("cpu"))
    import pickle

    back = _unpack(pickle.loads(meta), payload)
    for a, b in zip(shard.microbatches, back.microbatches):
        assert torch.equal(a.routed_experts, b.routed_experts) and torch.equal(a.tokens, b.tokens)
    samples[1].routed_experts = []
    with pytest.raises(ValueError, match="sample 1 has no routed experts"):
        train_batch([Group(0, "", samples)])


# ----------------------------------------------------------------------------- the trainer
def _gap(lp, batch):
    mask = batch.loss_mask != 0
    return (lp - batch.rollout_logprobs)[mask].abs().max().item()


@pytest.mark.multiproc
def test_replay_gives_the_engines_logprobs_at_the_dense_level_and_free_routing_does_not(models):
    near = train_batch(engine_rollout(models["near_tie"], routes=True))
    decisive = train_batch(engine_rollout(models["decisive"], routes=True))
    dense = train_batch(engine_rollout(models["dense"], routes=False))
    jobs = [(models["near_tie"], near, True), (models["decisive"], decisive, True), (models["dense"], dense, False)]
    got_near, got_decisive, got_dense = run_distributed(logprobs_case, 1, jobs, timeout_s=600)[0]
    gaps = {
        "dense": _gap(got_dense["free"], dense),
        "decisive_replayed": _gap(got_decisive["replayed"], decisive),
        "decisive_free": _gap(got_decisive["free"], decisive),
        "near_tie_replayed": _gap(got_near["replayed"], near),
        "near_tie_free": _gap(got_near["free"], near),
    }
    print(f"max |trainer log-prob - engine log-prob| over response tokens: {gaps}")
    level = max(10 * gaps["dense"], 1e-5)  # the dense models' parity, with room for the MoE kernels
    assert gaps["near_tie_replayed"] < level, gaps
    assert gaps["decisive_replayed"] < level, gaps
    assert gaps["near_tie_free"] > 100 * gaps["near_tie_replayed"], gaps  # flipped experts show
    print(f"first-update ratio max with replay: near tie {got_near['step']['ratio_max']:.8f}, "
          f"decisive {got_decisive['step']['ratio_max']:.8f}")  # fmt: skip
    for got in (got_near, got_decisive):
        # one update per step: the training forward sees the weights pi_old was recomputed with, so
        # the ratio is 1 only if both forwards replayed the same experts
        assert abs(got["step"]["ratio_max"] - 1) < 1e-5, got["step"]
        assert torch.isfinite(torch.tensor(got["step"]["loss"])), got["step"]
        assert got["router_moved"] > 0, "under replay the router must still get gradients"


# ----------------------------------------------------------------------------- the CLI
def test_cli_trains_a_tiny_moe_two_steps_with_routing_replay(tmp_path):
    """``dapo-megatron train`` (tiny_cpu.yaml) on a Qwen3-MoE written here with the demo's tokenizer,
    ``algo.routing_replay=rollout``: 2 steps, the dumped rollouts carry every read token's experts,
    and the first step's weight check sees the trainer reproduce the engine's log-probs."""
    import json
    import shutil

    from cli_runs import TINY, run_cli, write_demo_assets

    assets = write_demo_assets(tmp_path / "assets")
    moe = tmp_path / "moe"
    moe.mkdir()
    for f in (assets / "model").iterdir():
        if f.name != "config.json":
            shutil.copy(f, moe / f.name)
    config = json.loads((assets / "model" / "config.json").read_text())
    config.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                  intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16,
                  norm_topk_prob=True, router_aux_loss_coef=0.0, tie_word_embeddings=False)  # fmt: skip
    (moe / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    done = run_cli(assets, "train", "--config", TINY, f"run.dir={run}", f"model.hf_path={moe}",
                   "algo.routing_replay=rollout", "run.dump_rollouts=true", timeout=600)  # fmt: skip
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in steps) == 2, steps[-1]
    groups = load_groups(str(run / "rollouts" / "step_2.jsonl"))
    for s in (s for g in groups for s in g.samples):
        assert torch.tensor(s.routed_experts).shape == (len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2)
    check = next(line for line in done.stdout.splitlines() if line.startswith("weight check"))
    assert float(check.split("max ")[1].split(",")[0]) < 1e-5, check


# ----------------------------------------------------------------------------- SGLang
# SGLang 0.5.23's CPU backend cannot serve this: its routed-experts capturer pins a host buffer with
# cudaHostRegister (srt/mem_cache/pool_host/common.py), which a CPU build of torch refuses at start-up.
# So the adapter is tested against the response shape SGLang's source defines: meta_info
# ["routed_experts"] is base64 of int32 [prompt + output - 1, num_hidden_layers, topk], C order
# (srt/state_capturer/routed_experts.py, encoded in srt/managers/detokenizer_manager.py).
def _sglang_body(ids, output_ids):
    import base64

    encoded = base64.b64encode(ids.to(torch.int32).numpy().tobytes()).decode("utf-8")
    return {
        "output_ids": output_ids,
        "meta_info": {"id": "r", "finish_reason": {"type": "stop"}, "weight_version": "3", "routed_experts": encoded,
                      "output_token_logprobs": [[-0.5, t, None] for t in output_ids]},
    }  # fmt: skip


def test_sglang_adapter_asks_for_routes_and_decodes_them():
    import asyncio
    import json

    import httpx

    from dapo_megatron.rollout import sglang_api as api
    from dapo_megatron.rollout.sglang import SGLangEngine
    from dapo_megatron.rollout.sglang_server import ServerOptions, launch_sglang_server

    prompt, output = [5, 6, 7], [8, 9, 2]
    ids = torch.randint(0, 8, (len(prompt) + len(output) - 1, 3, 2), generator=torch.Generator().manual_seed(0))
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=_sglang_body(ids, output))

    async def generate(engine, params):
        try:
            return await engine.generate(prompt, params, timeout_s=5)
        finally:
            await engine._client.aclose()

    def engine(topk):
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return SGLangEngine("http://s", client=client, routing_topk=topk)

    params = SamplingParams(max_new_tokens=4, return_routed_experts=True)
    [c] = asyncio.run(generate(engine(2), params))
    assert sent[-1]["return_routed_experts"] is True and c.meta["routed_experts"] == ids.tolist()
    [plain] = asyncio.run(generate(engine(None), SamplingParams(max_new_tokens=4)))  # the mock answers routes anyway
    assert "return_routed_experts" not in sent[-1] and "routed_experts" not in plain.meta
    with pytest.raises(ValueError, match="routing_topk"):
        asyncio.run(generate(engine(None), params))
    with pytest.raises(api.SGLangRequestError, match="do not split into 5 positions"):
        api.decode_routed_experts(_sglang_body(ids[:4], output)["meta_info"]["routed_experts"], 5, 2)
    argv = launch_sglang_server(ServerOptions("m", device="cpu", return_routed_experts=True))
    assert "--enable-return-routed-experts" in argv
    assert "--enable-return-routed-experts" not in launch_sglang_server(ServerOptions("m", device="cpu"))


def test_config_rule_names_engines_that_cannot_return_routes():
    from dapo_megatron.config_rules import routing_replay_problem

    assert routing_replay_problem("rollout", "vllm") == (
        "algo.routing_replay: 'rollout' needs an engine that returns routed experts (embedded, sglang), "
        "but rollout.engine is 'vllm'; use algo.routing_replay: none"
    )
    assert routing_replay_problem("rollout", "embedded") is None and routing_replay_problem("rollout", "sglang") is None
    assert routing_replay_problem("none", "vllm") is None
    # training on dumped steps reads the routes from the dump
    assert routing_replay_problem("rollout", "vllm", replay_rollouts="runs/x/rollouts") is None


def test_actor_refuses_replay_on_a_dense_model_and_with_full_recompute():
    from dapo_megatron.megatron.moe_replay import RoutingReplayError, check_replay_support, replay_scope

    with pytest.raises(RoutingReplayError, match="model is dense"):
        check_replay_support("rollout", None, None)
    with pytest.raises(RoutingReplayError, match="recompute_granularity=full"):
        check_replay_support("rollout", object(), "full")
    check_replay_support("rollout", object(), "selective")
    check_replay_support("none", None, "full")
    with pytest.raises(RoutingReplayError, match="carries no routed experts"):
        replay_scope(object(), None, True)

"""Chunked vocab-parallel log-probs and entropy against dense log_softmax, values and gradients."""

import pytest
import torch

from dapo_megatron.megatron.logprobs import token_logprobs_and_entropy
from tests.distributed_harness import run_distributed

TOL = 1e-5


def _dense(logits, targets, temperature=1.0, valid_vocab_size=None):
    """Reference: full-vocabulary log_softmax(logits / T) with autograd."""
    z = logits / temperature
    if valid_vocab_size is not None:
        pad = torch.full_like(z[..., valid_vocab_size:], float("-inf"))
        z = torch.cat([z[..., :valid_vocab_size], pad], dim=-1)
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def _case(shape=(3, 5), vocab=64, valid=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g, dtype=dtype) * 3
    if valid is not None:
        logits[..., valid:] = 25.0  # padded rows produce large real logits: they must be masked, not used
    targets = torch.randint(0, valid or vocab, shape, generator=g)
    weights = torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)
    return logits, targets, weights


def _grads(fn, logits, targets, weights, **kw):
    x = logits.clone().requires_grad_()
    logp, ent = fn(x, targets, **kw)
    loss = (logp * weights[0]).sum() + ((ent * weights[1]).sum() if ent is not None else 0)
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), x.grad


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1024])
def test_single_process_matches_dense_for_any_chunking(chunk_size):
    logits, targets, w = _case()  # 15 tokens: 4 and 7 do not divide it
    lp, ent, g = _grads(token_logprobs_and_entropy, logits, targets, w, chunk_size=chunk_size)
    lp_ref, ent_ref, g_ref = _grads(_dense, logits, targets, w)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5) and ent.shape == (3, 5)
    assert (lp - lp_ref).abs().max() <= TOL
    assert (ent - ent_ref).abs().max() <= TOL
    assert (g - g_ref).abs().max() <= TOL


def test_temperature_divides_logits_first():
    logits, targets, w = _case(seed=1)
    lp, ent, g = _grads(token_logprobs_and_entropy, logits, targets, w, temperature=0.6, chunk_size=4)
    lp_ref, ent_ref, g_ref = _grads(_dense, logits, targets, w, temperature=0.6)
    assert (lp - lp_ref).abs().max() <= TOL and (ent - ent_ref).abs().max() <= TOL
    assert (g - g_ref).abs().max() <= TOL
    lp_t1, _ = token_logprobs_and_entropy(logits, targets)
    assert (lp - lp_t1).abs().max() > 0.1  # the temperature really changed the distribution


def test_padded_vocab_columns_are_masked():
    logits, targets, w = _case(vocab=64, valid=50, seed=2)
    lp, ent, g = _grads(token_logprobs_and_entropy, logits, targets, w, chunk_size=4, valid_vocab_size=50)
    lp_ref, ent_ref, g_ref = _grads(_dense, logits, targets, w, valid_vocab_size=50)
    assert (lp - lp_ref).abs().max() <= TOL and (ent - ent_ref).abs().max() <= TOL
    assert (g - g_ref).abs().max() <= TOL
    assert torch.all(g[..., 50:] == 0)
    unmasked, _ = token_logprobs_and_entropy(logits, targets)
    assert (unmasked - lp).abs().max() > 1.0  # without the mask the padded logits (25.0) dominate


def test_minus_inf_logits_give_finite_entropy_and_grads():
    logits, targets, w = _case(seed=3)
    logits[..., :10] = float("-inf")
    targets = targets.clamp(min=10)
    lp, ent, g = _grads(token_logprobs_and_entropy, logits, targets, w, chunk_size=6)
    lp_ref, ent_ref, g_ref = _grads(_dense, logits, targets, w)
    assert torch.isfinite(ent).all() and torch.isfinite(g).all()
    assert (lp - lp_ref).abs().max() <= TOL and (ent - ent_ref).abs().max() <= TOL
    assert (g - g_ref).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_noncontiguous_layouts_values_and_gradients(layout):
    logits, targets, w = _case(shape=(4, 7), seed=4)
    x = logits.clone().requires_grad_()
    if layout == "transposed":  # [s, b, v] view of [b, s, v]
        view, tgt, weights = x.transpose(0, 1), targets.t(), (w[0].t(), w[1].t())
    else:  # the actor's next-token slice logits[:, :-1] of a contiguous [b, t, v]
        view, tgt, weights = x[:, :-1], targets[:, 1:], (w[0][:, 1:], w[1][:, 1:])
    lp, ent = token_logprobs_and_entropy(view, tgt, chunk_size=5)
    ((lp * weights[0]).sum() + (ent * weights[1]).sum()).backward()
    ref = logits.clone().requires_grad_()
    ref_view = ref.transpose(0, 1) if layout == "transposed" else ref[:, :-1]
    lp_ref, ent_ref = _dense(ref_view, tgt)
    ((lp_ref * weights[0]).sum() + (ent_ref * weights[1]).sum()).backward()
    assert (lp - lp_ref).abs().max() <= TOL and (ent - ent_ref).abs().max() <= TOL
    assert (x.grad - ref.grad).abs().max() <= TOL


def test_rows_are_views_not_copies():
    from dapo_megatron.megatron.logprobs import _chunks, _rows_2d

    x = torch.randn(3, 5, 8)
    assert len(_rows_2d(x)) == 1 and len(_rows_2d(x[:, :-1])) == 3 and len(_rows_2d(x.transpose(0, 1))) == 5
    base = x.untyped_storage().data_ptr()
    for view in (x, x[:, :-1], x.transpose(0, 1)):
        assert all(b.untyped_storage().data_ptr() == base for b in _rows_2d(view))
    offsets = [(o, c.shape[0]) for o, c in _chunks(x[:, :-1], 3)]
    assert offsets == [(0, 3), (3, 1), (4, 3), (7, 1), (8, 3), (11, 1)]


def test_without_entropy_and_logp_only_gradient():
    logits, targets, w = _case(seed=5)
    lp, ent, g = _grads(token_logprobs_and_entropy, logits, targets, w, chunk_size=4, compute_entropy=False)
    assert ent is None
    x = logits.clone().requires_grad_()
    (_dense(x, targets)[0] * w[0]).sum().backward()
    assert (g - x.grad).abs().max() <= TOL
    # entropy computed but unused by the loss: its grad is None in backward and must be skipped
    x2 = logits.clone().requires_grad_()
    lp2, _ = token_logprobs_and_entropy(x2, targets, chunk_size=4)
    (lp2 * w[0]).sum().backward()
    assert (x2.grad - x.grad).abs().max() <= TOL


def test_bf16_logits_gradient_dtype():
    logits, targets, w = _case(seed=6)
    x = logits.to(torch.bfloat16).requires_grad_()
    lp, ent = token_logprobs_and_entropy(x, targets, chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    lp_ref, _ = _dense(x.detach().float(), targets)
    assert (lp - lp_ref).abs().max() <= TOL  # math in fp32 on the bf16 values


def test_gradcheck_float64():
    logits, targets, _ = _case(shape=(2, 3), vocab=9, valid=8, seed=7, dtype=torch.float64)
    x = logits.requires_grad_()

    def fn(inp):
        return token_logprobs_and_entropy(inp, targets, temperature=0.8, chunk_size=4, valid_vocab_size=8)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_argument_errors():
    logits, targets, _ = _case()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_logprobs_and_entropy(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets shape \(5, 3\) must equal logits' leading dims \(3, 5\)"):
        token_logprobs_and_entropy(logits, targets.t())


def _tp2_shards(rank, world_size, temperature, valid, chunk_size):
    """Each rank holds half the vocabulary of the same logits; returns values and its grad shard."""
    import torch.distributed as dist

    from dapo_megatron.parallel.init import init_distributed

    init_distributed()
    group = dist.new_group([0, 1])
    logits, targets, w = _case(shape=(5, 7), vocab=96, valid=valid, seed=11)  # 35 tokens
    shard = logits.chunk(world_size, dim=-1)[rank].clone().requires_grad_()
    lp, ent = token_logprobs_and_entropy(
        shard, targets, temperature=temperature, chunk_size=chunk_size, tp_group=group, valid_vocab_size=valid
    )
    ((lp * w[0]).sum() + (ent * w[1]).sum()).backward()
    dist.destroy_process_group()
    return lp.detach(), ent.detach(), shard.grad


@pytest.mark.multiproc
def test_tp2_matches_dense_values_and_gradients():
    # valid=80 of 96: rank 1's shard (columns 48..95) holds real and padded columns; targets fall on both ranks
    temperature, valid, chunk = 0.7, 80, 8
    (lp0, ent0, g0), (lp1, ent1, g1) = run_distributed(_tp2_shards, 2, temperature, valid, chunk, timeout_s=120)
    logits, targets, w = _case(shape=(5, 7), vocab=96, valid=valid, seed=11)
    assert (targets < 48).any() and (targets >= 48).any()
    lp_ref, ent_ref, g_ref = _grads(_dense, logits, targets, w, temperature=temperature, valid_vocab_size=valid)
    for lp, ent in ((lp0, ent0), (lp1, ent1)):
        assert (lp - lp_ref).abs().max() <= TOL
        assert (ent - ent_ref).abs().max() <= TOL
    assert (torch.cat([g0, g1], dim=-1) - g_ref).abs().max() <= TOL
    assert torch.all(g1[..., valid - 48 :] == 0)

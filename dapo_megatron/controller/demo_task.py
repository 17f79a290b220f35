"""The embedded demo's verifiable task, tokenizer and model shape, all built in code (no downloads).

Task: integer arithmetic written in the DAPO answer format. A prompt is ``"37+58"``; a correct
response is ``"Answer: 95"`` followed by EOS, scored by the same DAPO-Math rule scorer as real runs.
Rows use the DAPO-Math-17k schema, so the demo goes through the real data path.

The tokenizer is character-level (digits, operators, the letters of ``Answer:``) with a two-token
chat template, so sequences are ~16 tokens and a 2-core CPU can run hundreds of RL steps.
"""

from __future__ import annotations

import os
import random
import re
from typing import Dict, List, Sequence

DEMO_CHARS = "0123456789+-*= Answer:"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_demo_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with a chat template; ids are stable across calls."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: Dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + sorted(set(DEMO_CHARS)):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without the spaces WordLevel would insert
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def demo_hf_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, eos_token_id: int = 1) -> dict:
    """A tiny Qwen2 ``config.json`` as a dict. head_dim = hidden/heads = 32 (vLLM's CPU minimum)."""
    heads = max(1, hidden_size // 32)
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 3,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def demo_moe_hf_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, eos_token_id: int = 1,
                       num_experts: int = 8, topk: int = 2, moe_intermediate_size: int = 64) -> dict:  # fmt: skip
    """A tiny Qwen3-MoE ``config.json`` as a dict: the dense demo's attention shape (head_dim 32) with
    every layer's MLP replaced by ``num_experts`` SwiGLU experts of width ``moe_intermediate_size``,
    ``topk`` per token.

    As in Qwen3-30B-A3B: q/k RMSNorm, no attention bias, top-k probabilities renormalised
    (``norm_topk_prob``), untied ``lm_head``, no dense layers between MoE layers. HF's router aux loss
    is 0: the trainer's load-balancing loss is ``model.moe_aux_loss_coeff``.
    """
    dense = demo_hf_config(vocab_size, hidden_size=hidden_size, num_layers=num_layers, eos_token_id=eos_token_id)
    return {
        **dense,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "head_dim": hidden_size // dense["num_attention_heads"],
        "attention_bias": False,
        "tie_word_embeddings": False,
        "num_experts": num_experts,
        "num_experts_per_tok": topk,
        "moe_intermediate_size": moe_intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
    }


def arithmetic_problem(rng: random.Random, max_operand: int, ops: Sequence[str], chain: int = 2) -> tuple:
    """One problem ``(text, answer)``; subtraction never goes negative, so answers are digits only.
    ``chain > 2``: a sum of ``chain`` operands (``ops`` must be ``("+",)``), worked out step by step."""
    if chain > 2:
        terms = [rng.randint(0, max_operand) for _ in range(chain)]
        return "+".join(map(str, terms)), str(sum(terms))
    op = rng.choice(list(ops))
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}", str(value)


def make_rows(n: int, *, seed: int, max_operand: int = 99, ops: Sequence[str] = ("+",), exclude=(),
              chain: int = 2) -> List[dict]:  # fmt: skip
    """``n`` distinct problems as DAPO-Math-17k rows; problems in ``exclude`` (texts) are skipped."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows: List[dict] = []
    limit = (max_operand + 1) ** chain * (len(ops) if chain == 2 else 1)
    if n > limit - len(seen):
        raise ValueError(f"make_rows: asked for {n} distinct problems but only {limit - len(seen)} exist")
    while len(rows) < n:
        text, answer = arithmetic_problem(rng, max_operand, ops, chain)
        if text in seen:
            continue
        seen.add(text)
        rows.append(
            {
                "data_source": "demo_arithmetic",
                "prompt": [{"role": "user", "content": text}],
                "ability": "math",
                "reward_model": {"ground_truth": answer, "style": "rule"},
                "extra_info": {"index": len(rows)},
            }
        )
    return rows


_CHAIN = re.compile(r"\d+(?:\+\d+){2,}")


def worked_answer(problem: str, answer: str) -> str:
    """The supervised response to ``problem``: ``"Answer: <answer>"``; for a chained sum (three or more
    operands) the running sums come first, left to right: ``"12+7=19 19+5=24 Answer: 24"``."""
    chains = _CHAIN.findall(problem)
    if not chains:
        return f"Answer: {answer}"
    terms = [int(t) for t in chains[-1].split("+")]
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return " ".join(steps) + f" Answer: {answer}"


def write_rows_parquet(rows: List[dict], path: str) -> None:
    """Write rows to parquet atomically (temp file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)

"""``dapo-megatron demo``: the whole product on a laptop, with nothing downloaded.

1. Assets: a character tokenizer and a tiny Qwen2 config built in code, train/held-out problems
   (disjoint) written as DAPO-Math parquet (``controller/demo_task.py``).
2. Warm-up: ``demo.sft_steps`` supervised updates of the same Megatron actor (token-mean
   cross-entropy on ``Answer: <n><eos>``), saved as a checkpoint.
3. DAPO: the real training loop from that checkpoint with the embedded engine; it evaluates on the
   held-out set before the first step and at the end (``run.eval_every``).
4. Export: the final checkpoint to ``<run.dir>/export/step_<N>`` (N its step, written atomically),
   evaluated again through a fresh engine: always the model ``acc_after_rl`` measured.

The printed summary has held-out accuracy after the warm-up (before RL), after RL, and of the
exported model.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Tuple

import torch

from dapo_megatron.config import Config, DemoConfig
from dapo_megatron.controller.run_dir import RunLock

SFT_DIR = "sft"


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's model folder and prompt files are (all under the run directory)."""

    model_dir: str
    train_file: str
    eval_file: str


def write_assets(cfg: Config, root: str) -> DemoAssets:
    """Tokenizer + ``config.json`` into ``root/model``, problems into ``root/data`` (idempotent; existing
    assets of another ``demo.model_type`` raise ``ValueError``)."""
    from dapo_megatron.controller.demo_task import build_demo_tokenizer, make_rows, write_rows_parquet

    d = cfg.demo
    assets = DemoAssets(os.path.join(root, "model"), os.path.join(root, "data", "train.parquet"),
                        os.path.join(root, "data", "eval.parquet"))  # fmt: skip
    config_json = os.path.join(assets.model_dir, "config.json")
    if all(os.path.exists(p) for p in (config_json, assets.train_file, assets.eval_file)):
        with open(config_json) as f:
            found = json.load(f).get("model_type")
        if found != d.model_type:  # a re-run must not train another architecture than its config names
            raise ValueError(f"demo.model_type={d.model_type!r} but {config_json} (written by an earlier run) has "
                             f"model_type={found!r}; use another run.dir")  # fmt: skip
        return assets
    os.makedirs(os.path.dirname(assets.train_file), exist_ok=True)
    tok = build_demo_tokenizer()
    hf = _model_config(d, len(tok), tok.eos_token_id)
    tmp = f"{assets.model_dir}.tmp-{os.getpid()}"
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    os.replace(tmp, assets.model_dir)
    held_out = make_rows(d.num_eval, seed=cfg.data.seed + 1, max_operand=d.max_operand, ops=d.ops, chain=d.chain)
    exclude = {r["prompt"][0]["content"] for r in held_out}
    train = make_rows(d.num_train, seed=cfg.data.seed, max_operand=d.max_operand, ops=d.ops, exclude=exclude,
                      chain=d.chain)  # fmt: skip
    write_rows_parquet(held_out, assets.eval_file)
    write_rows_parquet(train, assets.train_file)
    return assets


def _model_config(d: DemoConfig, vocab_size: int, eos_token_id: int) -> dict:
    """The ``config.json`` of the tiny model ``demo.model_type`` names (dense Qwen2 or Qwen3-MoE)."""
    from dapo_megatron.controller.demo_task import demo_hf_config, demo_moe_hf_config

    shape = dict(hidden_size=d.hidden_size, num_layers=d.num_layers, eos_token_id=eos_token_id)
    moe = dict(num_experts=d.num_experts, topk=d.moe_topk, moe_intermediate_size=d.moe_intermediate_size)
    builders: Dict[str, Callable[[], dict]] = {
        "qwen2": lambda: demo_hf_config(vocab_size, **shape),
        "qwen3_moe": lambda: demo_moe_hf_config(vocab_size, **shape, **moe),
    }
    return builders[d.model_type]()


def with_assets(cfg: Config, assets: DemoAssets, *, load: str = "") -> Config:
    """``cfg`` pointed at the demo's model folder, data files and (optionally) a start checkpoint."""
    return replace(
        cfg,
        model=replace(cfg.model, hf_path=assets.model_dir, load=load or cfg.model.load),
        data=replace(cfg.data, train_files=(assets.train_file,), eval_files=(assets.eval_file,), template="none"),
    )


def _sft_examples(cfg: Config, tokenizer: Any) -> List[Tuple[List[int], List[int]]]:
    """``(prompt ids, answer ids)`` of every training row; the answer is
    :func:`~dapo_megatron.controller.demo_task.worked_answer` + eos."""
    from dapo_megatron.controller.demo_task import worked_answer
    from dapo_megatron.controller.prompts import load_prompts

    data, prompts = load_prompts(cfg.data.train_files, tokenizer, cfg)
    out = []
    for i, p in enumerate(prompts):
        answer = tokenizer.encode(worked_answer(data[i].problem_key, data[i].ground_truth), add_special_tokens=False)
        out.append((p, answer + [tokenizer.eos_token_id]))
    return out


def _sft_batch(examples: list, rng: random.Random, size: int, pad_id: int) -> tuple:
    """Right-padded ``tokens [B, T]`` and target-aligned ``loss_mask [B, T]`` (1 on answer tokens)."""
    chosen = [examples[rng.randrange(len(examples))] for _ in range(size)]
    width = max(len(p) + len(a) for p, a in chosen)
    tokens = torch.full((size, width), pad_id, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.float32)
    for row, (p, a) in enumerate(chosen):
        tokens[row, : len(p) + len(a)] = torch.tensor(p + a)
        mask[row, len(p) : len(p) + len(a)] = 1.0
    return tokens, mask


def sft_warmup(cfg: Config, out: str, *, progress: bool = True) -> Dict[str, float]:
    """``demo.sft_steps`` cross-entropy updates from random init; saves the weights at ``out``."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from dapo_megatron.controller.session import start_trainer
    from dapo_megatron.megatron.checkpoint import save_checkpoint
    from dapo_megatron.parallel.init import shutdown

    d = cfg.demo
    sft_cfg = replace(
        cfg,
        optim=replace(cfg.optim, lr=d.sft_lr, lr_warmup_steps=min(20, d.sft_steps), lr_decay_style="constant"),
        train=replace(cfg.train, total_steps=max(1, d.sft_steps), ppo_mini_batch_size=cfg.rollout.prompts_per_step),
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    examples, rng = _sft_examples(cfg, tokenizer), random.Random(cfg.data.seed)
    _, _, _, actor = start_trainer(sft_cfg)
    losses = []
    try:
        for _ in tqdm(range(d.sft_steps), desc="sft warm-up", unit="step", disable=not progress):
            tokens, mask = _sft_batch(examples, rng, d.sft_batch_size, tokenizer.pad_token_id)
            losses.append(actor.sft_step(tokens, mask)["loss"])
        save_checkpoint(actor, out, step=0, extra_state={"sft_steps": d.sft_steps})
    finally:
        shutdown()
    nan = float("nan")
    return {"sft/loss_first": losses[0] if losses else nan, "sft/loss_last": losses[-1] if losses else nan}


def export_checkpoint(cfg: Config, ckpt: str, out: str) -> None:
    """Export ``ckpt`` to the HF folder ``out`` (float32, the demo's dtype), atomically.

    Invariant: ``out`` exists only complete. It is written as ``out.tmp-<pid>`` and renamed, so an
    existing ``out`` is a finished export of the same checkpoint (the caller names ``out`` after the
    checkpoint's step) and is kept. Call with the run folder locked: stale tmp folders of ``out``
    left by a killed demo are deleted first, which is safe only while no other process writes here.
    """
    import argparse
    import shutil

    from dapo_megatron.weights.export_hf import run_export

    if os.path.isdir(out):
        return
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):
        if entry.startswith(f"{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = os.path.join(parent, f"{name}.tmp-{os.getpid()}")
    args = argparse.Namespace(ckpt=ckpt, hf_dir=cfg.model.hf_path, out=tmp, dtype="float32",
                              max_shard_size=5 * 1024**3, no_progress=True)  # fmt: skip
    if run_export(args) != 0:
        raise RuntimeError(f"export of {ckpt} to {out} failed (see the error above)")
    os.replace(tmp, out)


def _step_of(ckpt: str) -> int:
    """The step in a checkpoint folder's name (``step_000040``, or its ``.old-*`` twin)."""
    match = re.match(r"step_(\d+)", os.path.basename(ckpt))
    if match is None:
        raise RuntimeError(f"checkpoint folder {ckpt!r}: expected a name like step_000040")
    return int(match.group(1))


def eval_hf_folder(cfg: Config, model_dir: str) -> Dict[str, float]:
    """avg@k of the HF model in ``model_dir`` on ``data.eval_files`` through a fresh embedded engine."""
    from transformers import AutoTokenizer

    from dapo_megatron.controller.evaluate import eval_sampling, evaluate
    from dapo_megatron.controller.prompts import load_prompts
    from dapo_megatron.rewards import get_reward_fn
    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.weights.hf_io import HFReader

    if not cfg.data.eval_files:
        raise ValueError("data.eval_files is empty: give the evaluation parquet/jsonl files")
    HFReader(model_dir).close()  # checks config.json and every safetensors header, naming the file
    tok = AutoTokenizer.from_pretrained(model_dir)
    data, ids = load_prompts(cfg.data.eval_files, tok, cfg)
    engine = EmbeddedEngine.from_pretrained(model_dir)
    return evaluate([engine], data, ids, reward_fn=get_reward_fn(cfg.reward.name, cfg.reward.timeout_s),
                    decode=lambda t: tok.decode(t, skip_special_tokens=True), params=eval_sampling(cfg.eval),
                    seed=cfg.rollout.seed)  # fmt: skip


def run_demo(cfg: Config, *, console: bool = True) -> Dict[str, float]:
    """The four demo stages; returns (and prints) the accuracy summary and wall time."""
    from dapo_megatron.controller.run_dir import lock_run_dir

    start = time.perf_counter()
    root = os.path.abspath(cfg.run.dir)
    lock = lock_run_dir(root)  # one demo or train per folder, from here to the summary
    try:
        return _run_demo_locked(cfg, root, lock, console=console, start=start)
    finally:
        lock.release()


def _run_demo_locked(cfg: Config, root: str, lock: RunLock, *, console: bool, start: float) -> Dict[str, float]:
    from dapo_megatron.controller.loop import train
    from dapo_megatron.controller.run_dir import prepare_run_dir
    from dapo_megatron.megatron.checkpoint import latest_checkpoint
    from dapo_megatron.observability.sinks import read_metrics

    prepare_run_dir(root, resume=cfg.run.resume, config=cfg)  # marks the folder before assets go in
    assets = write_assets(cfg, os.path.join(root, "assets"))
    sft_ckpt = os.path.join(root, "assets", SFT_DIR)
    summary: Dict[str, float] = {}
    if not os.path.isfile(os.path.join(sft_ckpt, "meta.json")):
        summary.update(sft_warmup(with_assets(cfg, assets), sft_ckpt, progress=console))
    summary["time/sft_s"] = time.perf_counter() - start
    rl_cfg = with_assets(cfg, assets, load=sft_ckpt)
    train(rl_cfg, console=console, run_lock=lock)
    evals = [r for r in read_metrics(os.path.join(root, "metrics.jsonl")) if "eval/acc" in r]
    if not evals:
        raise RuntimeError("the demo's DAPO phase logged no evaluation; set run.eval_every > 0")
    summary["demo/acc_before_rl"] = evals[0]["eval/acc"]
    summary["demo/acc_after_rl"] = evals[-1]["eval/acc"]
    final = latest_checkpoint(os.path.join(root, "checkpoints"))
    if final is None:
        raise RuntimeError("the demo's DAPO phase saved no checkpoint; set run.save_every > 0")
    step = _step_of(final)
    if step != evals[-1]["step"]:  # acc_after_rl and acc_exported must describe the same weights
        raise RuntimeError(f"the last evaluation is of step {evals[-1]['step']} but the newest checkpoint "
                           f"{final!r} is of step {step}")  # fmt: skip
    # One folder per exported step: a re-run with more steps exports (and scores) its own final model.
    export_dir = os.path.join(root, "export", os.path.basename(final).split(".")[0])
    export_checkpoint(rl_cfg, final, export_dir)
    summary["demo/exported_step"] = float(step)
    summary["demo/acc_exported"] = eval_hf_folder(rl_cfg, export_dir)["eval/acc"]
    summary["time/total_s"] = time.perf_counter() - start
    _write_json_atomically(os.path.join(root, "demo_summary.json"), summary)
    return summary


def _write_json_atomically(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)

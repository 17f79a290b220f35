#!/usr/bin/env python
"""TRL's ``GRPOTrainer`` with the DAPO loss on the demo task: the TRL half of ``benchmarks/vs_trl.py``.

    .venv-trl/bin/python benchmarks/trl_grpo_run.py --model OUT/warmup_hf --train OUT/prompts_train.jsonl \
        --eval OUT/prompts_eval.jsonl --log OUT/trl/metrics.jsonl --steps 150 --eval-every 10

Runs in ``.venv-trl`` (``tools/trl_env.sh``): it imports TRL, transformers and, from this repository,
only the DAPO-Math scorer (``dapo_megatron.rewards``, pure stdlib), never this project's torch stack.

The settings mirror ``examples/demo_cpu.yaml`` (the flags say where they are given): a *step* is one
generation batch of ``prompts_per_step`` x ``n`` completions (32 x 8) followed by
``updates_per_step`` optimizer updates on halves of it (this project's ``ppo_mini_batch_size``: 16
prompts), so TRL recomputes the old log-probs as this project does. Reward: the DAPO-Math score
(+1/-1) plus TRL's soft overlong punishment with the demo's buffer (the same ramp as
``algo.overlong_buffer``). Loss: ``loss_type="dapo"`` (token mean), epsilon 0.2 / epsilon_high 0.28,
no KL, constant lr, Adam as the demo's, grad clip 1.0. Two of TRL's defaults are turned off to
match the demo: bf16 autocast (the demo computes in float32; CPUs without bf16 units run it several
times slower) and gradient checkpointing (it recomputes activations, which the demo does not). TRL
has no dynamic sampling.

Each step writes one JSON line to ``--log`` with this project's metric names: ``step``, ``wall_time``,
``time/generate_s`` (TRL's ``_generate``: tokenize + ``model.generate``), ``time/logprob_s`` (the
old log-probs), ``time/score_s`` (the rest of TRL's generate-and-score: rewards, advantages),
``time/train_s`` (the updates), each also in CPU seconds (``time/<phase>_cpu_s``), and on evaluation
steps ``eval/acc`` and ``time/eval_s``. Step 0 is the evaluation before training. Evaluation: the
whole held-out set in one batched ``generate`` with the demo's eval sampling (temperature 1.0, top_p
0.7, 16 new tokens), scored like the training reward's accuracy; the RNG state is restored afterwards,
so evaluating does not change the training samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_scorer():
    """``score_dapo_math`` from this repository (stdlib only: it imports no torch or megatron)."""
    sys.path.insert(0, REPO)
    from dapo_megatron.rewards.dapo_math import score_dapo_math

    return score_dapo_math


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_prompt_ids(tokenizer, rows: List[Dict[str, Any]], path: str) -> None:
    """TRL renders conversational prompts with the chat template; they must be this project's tokens."""
    for i, row in enumerate(rows):
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]  # fmt: skip
        if list(ids) != list(row["prompt_ids"]):
            raise SystemExit(f"{path} row {i}: TRL's prompt ids {list(ids)} differ from this project's "
                             f"{row['prompt_ids']}; the two runs would not see the same prompts")  # fmt: skip


class PhaseClock:
    """Wall and CPU seconds per phase since the last :meth:`take`; phases are named like this project's
    timers. CPU seconds (``time.process_time``: this process, every thread) show what a phase costs
    when the machine is shared and wall time is stretched by other work."""

    def __init__(self) -> None:
        self.totals: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}

    def add(self, phase: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu_seconds

    @contextmanager
    def timing(self, phase: str, *, inner: Sequence[str] = ()) -> Iterator[None]:
        """Time the body as ``phase``, less what the phases in ``inner`` added meanwhile (nested timers)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        before, cpu_before = dict(self.totals), dict(self.cpu)
        try:
            yield
        finally:
            nested = sum(self.totals.get(k, 0.0) - before.get(k, 0.0) for k in inner)
            cpu_nested = sum(self.cpu.get(k, 0.0) - cpu_before.get(k, 0.0) for k in inner)
            self.add(phase, time.perf_counter() - start - nested, time.process_time() - cpu_start - cpu_nested)

    def take(self) -> Dict[str, float]:
        out = {f"time/{k}_s": v for k, v in self.totals.items()}
        out.update({f"time/{k}_cpu_s": v for k, v in self.cpu.items()})
        self.totals, self.cpu = {}, {}
        return out


def make_trainer_class(clock: PhaseClock):
    """``GRPOTrainer`` with its phases timed: generation, old log-probs (the no-grad log-prob pass inside
    generate-and-score), the rest of generate-and-score, and the update (``training_step``)."""
    import torch
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, *args, **kwargs):
            with clock.timing("generate"):
                return super()._generate(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the loss's own pass: part of "train"
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with clock.timing("logprob"):  # the old (and reference) log-probs
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def _generate_and_score_completions(self, *args, **kwargs):
            with clock.timing("score", inner=("generate", "logprob")):  # rewards, advantages, padding
                return super()._generate_and_score_completions(*args, **kwargs)

        def training_step(self, *args, **kwargs):
            with clock.timing("train", inner=("generate", "logprob", "score")):
                return super().training_step(*args, **kwargs)

    return TimedGRPOTrainer


def evaluate(model, tokenizer, rows: List[Dict[str, Any]], score, *, top_p: float, temperature: float,
             max_new_tokens: int, seed: int) -> float:  # fmt: skip
    """Held-out accuracy: one sample per row, every row in one left-padded batch."""
    import torch

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer.pad({"input_ids": [r["prompt_ids"] for r in rows]}, return_tensors="pt")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        model.train(was_training)
    finally:
        tokenizer.padding_side = side
        torch.set_rng_state(state)
    width = batch["input_ids"].shape[1]
    texts = tokenizer.batch_decode(
        cut_at_eos(out[:, width:].tolist(), tokenizer.eos_token_id), skip_special_tokens=True
    )
    return sum(bool(score(t, r["ground_truth"]).acc) for t, r in zip(texts, rows)) / len(rows)


def cut_at_eos(rows: List[List[int]], eos: int) -> List[List[int]]:
    """Each row up to and including its first ``eos`` (what follows is padding)."""
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def make_callback(args, clock: PhaseClock, tokenizer, eval_rows, score, log):
    from transformers import TrainerCallback

    def eval_line(model, step: int) -> Dict[str, float]:
        start = time.perf_counter()
        acc = evaluate(model, tokenizer, eval_rows, score, top_p=args.eval_top_p, temperature=args.temperature,
                       max_new_tokens=args.max_len, seed=args.seed)  # fmt: skip
        return {"eval/acc": acc, "time/eval_s": time.perf_counter() - start}

    class StepLog(TrainerCallback):
        """One line per generation batch (``updates_per_step`` optimizer steps), after its evaluation."""

        def on_train_begin(self, targs, state, control, model=None, **kwargs):
            log({"step": 0, **eval_line(model, 0)})

        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step % args.updates_per_step:
                return
            step = state.global_step // args.updates_per_step
            line: Dict[str, Any] = {"step": step, **clock.take()}
            if step % args.eval_every == 0 or step == args.steps:
                line.update(eval_line(model, step))
            log(line)

    return StepLog()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the exported warm-up HF folder (with tokenizer)")
    p.add_argument("--train", required=True, help="prompts_train.jsonl from benchmarks/trl_prepare.py")
    p.add_argument("--eval", required=True, help="prompts_eval.jsonl from benchmarks/trl_prepare.py")
    p.add_argument("--log", required=True, help="metrics jsonl to write (one line per step)")
    p.add_argument("--steps", type=int, default=150, help="generation batches (train.total_steps)")
    p.add_argument("--eval-every", type=int, default=10, help="run.eval_every")
    p.add_argument("--prompts-per-step", type=int, default=32, help="rollout.prompts_per_step")
    p.add_argument("--n", type=int, default=8, help="rollout.n_samples_per_prompt")
    p.add_argument("--updates-per-step", type=int, default=2, help="prompts_per_step / train.ppo_mini_batch_size")
    p.add_argument("--max-len", type=int, default=16, help="rollout.max_response_len (and eval.max_response_len)")
    p.add_argument("--overlong-buffer", type=int, default=4, help="algo.overlong_buffer.len (0: off)")
    p.add_argument("--lr", type=float, default=5e-4, help="optim.lr")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout.temperature and eval.temperature")
    p.add_argument("--eval-top-p", type=float, default=0.7, help="eval.top_p")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    return run(args)


def run(args) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig
    from trl.rewards import get_soft_overlong_punishment

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    score = load_scorer()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_rows, eval_rows = read_jsonl(args.train), read_jsonl(args.eval)
    check_prompt_ids(tokenizer, train_rows + eval_rows, f"{args.train} / {args.eval}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def dapo_math(completions, ground_truth, **_):
        return [score(c[-1]["content"], gt).score for c, gt in zip(completions, ground_truth)]

    rewards = [dapo_math]
    if args.overlong_buffer > 0:
        rewards.append(get_soft_overlong_punishment(args.max_len, args.overlong_buffer))
    data = Dataset.from_list([{"prompt": r["messages"], "ground_truth": r["ground_truth"]} for r in train_rows])
    per_update = args.prompts_per_step * args.n // args.updates_per_step
    config = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.log)), "trl_out"), use_cpu=True,
        per_device_train_batch_size=per_update, gradient_accumulation_steps=1,
        steps_per_generation=args.updates_per_step, num_generations=args.n, num_iterations=1,
        max_completion_length=args.max_len, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
        max_steps=args.steps * args.updates_per_step, save_strategy="no", report_to="none",
        logging_steps=10**9, disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default recomputes activations: slower, and this project does not
        bf16=False,  # TRL's default is bf16 autocast, on CPU too; this project's demo computes in float32
    )  # fmt: skip
    clock = PhaseClock()
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    with open(args.log, "w") as sink:

        def log(line: Dict[str, Any]) -> None:
            sink.write(json.dumps({"step": line["step"], "wall_time": time.time(), **line}) + "\n")
            sink.flush()
            if "eval/acc" in line:
                print(f"trl step {line['step']}: held-out acc {line['eval/acc']:.3f}", flush=True)

        trainer = make_trainer_class(clock)(
            model=model, reward_funcs=rewards, args=config, train_dataset=data, processing_class=tokenizer,
            callbacks=[make_callback(args, clock, tokenizer, eval_rows, score, log)],
        )  # fmt: skip
        trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

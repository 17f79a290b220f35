#!/usr/bin/env python
"""This project vs Hugging Face TRL's ``GRPOTrainer`` (``loss_type="dapo"``) on the demo task, CPU.

    bash tools/trl_env.sh                                  # once: .venv-trl with TRL and a CPU torch
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --out runs/vs_trl [--steps 150] [overrides]
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --quick  # smoke run: 4 steps, short warm-up

One invocation, the two systems one after the other, from the same start:

1. ``benchmarks/trl_prepare.py``: the demo's supervised warm-up (once per ``--out``), exported as an HF
   folder with its tokenizer; this project loads it back converted to a megatron checkpoint, TRL with
   ``from_pretrained``. The same train/held-out problems (the demo's) go to both.
2. This project: ``dapo-megatron train`` with ``examples/demo_cpu.yaml`` (plus the overrides given
   here) on that model, ``run.eval_every=--eval-every``, no checkpoints.
3. TRL: ``benchmarks/trl_grpo_run.py`` in ``.venv-trl``, with the budget read from the same resolved
   config (prompts x samples per step, updates per step, lr, max length, overlong buffer, sampling
   temperature, eval top_p, seed), the DAPO-Math scorer as its reward, the same evaluation cadence.

Both run with one intra-op thread (``OMP_NUM_THREADS=1``). While each runs, the PSS of its whole
process tree is sampled every ``--pss-interval`` seconds (``psutil``); the peak is reported. The table
(``benchmarks/trl_report.py``) goes to stdout and ``OUT/vs_trl.md``, every figure to
``OUT/summary.json`` with the commit, the machine and its load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from trl_report import format_table, summarize  # noqa: E402

DEMO_CONFIG = os.path.join(REPO, "examples", "demo_cpu.yaml")
QUICK = {"steps": 4, "eval_every": 2, "checkpoints": [2, 4], "overrides": ["demo.sft_steps=60"]}


class TreePSS:
    """Samples the summed PSS (bytes) of a process and all its descendants in a thread; ``peak`` is the
    largest sum seen. PSS splits shared pages among the processes mapping them, so summing over a
    tree counts each page once (RSS would count shared libraries and shared memory many times)."""

    def __init__(self, pid: int, interval: float = 0.5, record: Optional[str] = None):
        import psutil

        self._psutil, self._root, self._interval, self._record = psutil, psutil.Process(pid), interval, record
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        """The tree's PSS now (processes that exit meanwhile are skipped)."""
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(self._psutil.Error):  # it exited meanwhile
                total += proc.memory_full_info().pss
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = self.sample()
            if now > self.peak and self._record:  # the peak so far survives a run that is stopped
                with open(self._record, "w") as f:
                    f.write(str(now))
            self.peak = max(self.peak, now)
            self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> TreePSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: List[str], log_path: str, *, env: Dict[str, str], interval: float,
                 record: Optional[str] = None) -> Tuple[float, int, float]:  # fmt: skip
    """Run ``cmd`` (output to ``log_path``) while sampling its tree's PSS; returns ``(t0, peak_pss, cpu_s)``,
    ``cpu_s`` the user+sys seconds of the process and every descendant reaped by its parent (less
    noisy than wall time on a shared machine). Raises ``RuntimeError`` quoting the log's tail on failure.
    ``record``: a JSON file that gets ``t0`` at the start, and ``record + ".pss"`` the peak so far (bytes),
    so that a run stopped early can still be reported (``--report-only``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if record:
            with open(record, "w") as f:
                json.dump({"t0": t0, "pid": proc.pid}, f)
        with TreePSS(proc.pid, interval, record=record and record + ".pss") as pss:
            rc = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {rc}; the end of {log_path}:\n{tail}")
    return t0, pss.peak, cpu_s


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def prepare(out: str, overrides: List[str], config: str) -> Dict[str, str]:
    cmd = [sys.executable, os.path.join(HERE, "trl_prepare.py"), "--out", out, "--config", config, *overrides]
    log = os.path.join(out, "prepare.log")
    os.makedirs(out, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=thread_env(), stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"the warm-up/export failed (exit {done.returncode}); see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ours_command(paths: Dict[str, str], run_dir: str, args: argparse.Namespace) -> List[str]:
    overrides = [*args.overrides, f"model.hf_path={paths['model']}", f"model.load={paths['mcore']}",
                 f"data.train_files=[{paths['train']}]", f"data.eval_files=[{paths['eval']}]", "data.template=none",
                 f"run.dir={run_dir}", f"train.total_steps={args.steps}", f"run.eval_every={args.eval_every}",
                 "run.save_every=0"]  # fmt: skip
    return [sys.executable, "-m", "dapo_megatron", "train", "--config", args.config, *overrides]


def trl_command(paths: Dict[str, str], log: str, args: argparse.Namespace) -> List[str]:
    """TRL's flags from the resolved config: the same budget, sampling and evaluation as this project."""
    sys.path.insert(0, REPO)
    from dapo_megatron.config_io import load_config

    cfg = load_config(args.config, args.overrides)
    r, a = cfg.rollout, cfg.algo
    if cfg.rollout.prompts_per_step % cfg.train.ppo_mini_batch_size:
        raise ValueError("rollout.prompts_per_step must be a multiple of train.ppo_mini_batch_size for TRL's split")
    buffer = a.overlong_buffer.len if a.overlong_buffer.enable else 0
    return [
        args.trl_python, os.path.join(HERE, "trl_grpo_run.py"), "--model", paths["model"],
        "--train", paths["prompts_train"], "--eval", paths["prompts_eval"], "--log", log,
        "--steps", str(args.steps), "--eval-every", str(args.eval_every),
        "--prompts-per-step", str(r.prompts_per_step), "--n", str(r.n_samples_per_prompt),
        "--updates-per-step", str(r.prompts_per_step // cfg.train.ppo_mini_batch_size),
        "--max-len", str(r.max_response_len), "--overlong-buffer", str(buffer), "--lr", str(cfg.optim.lr),
        "--temperature", str(r.temperature), "--eval-top-p", str(cfg.eval.top_p), "--seed", str(cfg.model.seed),
    ]  # fmt: skip


def read_lines(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_side(name: str, cmd: List[str], metrics: str, out: str, args: argparse.Namespace,
             env: Dict[str, str]) -> Dict[str, Any]:  # fmt: skip
    print(f"[vs_trl] {name}: {' '.join(cmd)}", flush=True)
    t0, peak, cpu_s = run_measured(cmd, os.path.join(out, f"{name}.log"), env=env, interval=args.pss_interval,
                                   record=os.path.join(out, f"{name}.start.json"))  # fmt: skip
    summary = summarize(read_lines(metrics), t0=t0, threshold=args.threshold, checkpoints=args.checkpoints)
    summary["peak_pss"], summary["cpu_s"], summary["t0"] = peak, cpu_s, t0
    print(f"[vs_trl] {name}: {summary['steps']} steps in {summary['total_s']:.1f} s, "
          f"held-out {summary['acc_first']:.3f} -> {summary['acc_last']:.3f}", flush=True)  # fmt: skip
    return summary


def partial_summary(name: str, metrics: str, out: str, args: argparse.Namespace) -> Dict[str, Any]:
    """A side's figures from what its run logged so far (a run stopped before the end): ``t0`` and the
    peak PSS so far from the files :func:`run_measured` keeps; CPU seconds are unknown (None)."""
    with open(os.path.join(out, f"{name}.start.json")) as f:
        t0 = json.load(f)["t0"]
    summary = summarize(read_lines(metrics), t0=t0, threshold=args.threshold, checkpoints=args.checkpoints)
    pss = os.path.join(out, f"{name}.start.json.pss")
    summary["peak_pss"] = None
    if os.path.isfile(pss):
        with open(pss) as f:
            summary["peak_pss"] = int(f.read())
    summary["cpu_s"], summary["partial"] = None, True
    return summary


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": rev.stdout.strip() + ("+dirty" if dirty.stdout else "")}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default runs/vs_trl, or runs/vs_trl_quick)")
    p.add_argument("--config", default=DEMO_CONFIG, help="the demo config both runs follow")
    p.add_argument("--steps", type=int, default=150, help="training steps of each system")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (both)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100, 150], help="steps whose accuracy is shown")
    p.add_argument("--threshold", type=float, default=0.9, help="held-out accuracy for the time-to-threshold row")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, eval every 2, 60 warm-up steps")
    p.add_argument("--only", choices=("ours", "trl"), default=None, help="run one side (the other's last "
                   "summary in OUT/summary.json is reused for the table)")  # fmt: skip
    p.add_argument("--trl-python", default=os.path.join(REPO, ".venv-trl", "bin", "python"),
                   help="TRL's interpreter (tools/trl_env.sh makes .venv-trl)")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="no runs: the table from OUT's logs as they are "
                   "(finished sides from OUT/summary.json, one stopped early from its metrics so far)")  # fmt: skip
    p.add_argument("--pss-interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for the warm-up and this project's run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.checkpoints = QUICK["steps"], QUICK["eval_every"], QUICK["checkpoints"]
        args.overrides = [*QUICK["overrides"], *args.overrides]
    args.out = os.path.abspath(args.out or os.path.join(REPO, "runs", "vs_trl_quick" if args.quick else "vs_trl"))
    if args.only != "ours" and not args.report_only and not os.path.isfile(args.trl_python):
        p.error(f"--trl-python {args.trl_python}: no such interpreter; run tools/trl_env.sh first")
    return args


def report_only(args: argparse.Namespace) -> int:
    summary_path = os.path.join(args.out, "summary.json")
    done: Dict[str, Any] = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            done = json.load(f)
    results = {}
    for side in ("ours", "trl"):
        metrics = os.path.join(args.out, side, "metrics.jsonl")
        if side not in done:
            results[side] = partial_summary(side, metrics, args.out, args)
            continue
        results[side] = finished = done[side]
        if os.path.isfile(metrics):  # recomputed, so that --checkpoints and --threshold apply
            lines = read_lines(metrics)
            t0 = finished.get("t0", max(r["wall_time"] for r in lines) - finished["total_s"])
            results[side] = {
                **finished,
                **summarize(lines, t0=t0, threshold=args.threshold, checkpoints=args.checkpoints),
            }
    info = done.get("machine") or {**machine(), "load_before": os.getloadavg(), "load_after": os.getloadavg()}
    return print_table(results, info, args)


def print_table(results: Dict[str, Any], info: Dict[str, Any], args: argparse.Namespace) -> int:
    for side in results.values():  # JSON keys are strings: back to steps
        side["acc"] = {int(k): v for k, v in side["acc"].items()}
    table = format_table(results["ours"], results["trl"], args.checkpoints)
    load = f"load average {info['load_before'][0]:.2f} before, {info['load_after'][0]:.2f} after"
    partial = [k for k, v in results.items() if v.get("partial")]
    note = f"; stopped early (figures so far): {', '.join(partial)}" if partial else ""
    text = f"{table}\n\nmachine: {info['cpu']}, {info['cores']} cores; commit {info['commit']}; {load}{note}\n"
    with open(os.path.join(args.out, "vs_trl.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args)
    info = {**machine(), "load_before": os.getloadavg(), "command": " ".join(sys.argv)}
    print(f"[vs_trl] preparing the shared warm-up model in {args.out}", flush=True)
    paths = prepare(args.out, args.overrides, args.config)
    summary_path = os.path.join(args.out, "summary.json")
    old: Dict[str, Any] = {}
    if args.only and os.path.isfile(summary_path):
        with open(summary_path) as f:
            old = json.load(f)
    results: Dict[str, Any] = {k: old[k] for k in ("ours", "trl") if k in old}
    if args.only != "trl":
        run_dir = os.path.join(args.out, "ours")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time (the folder is the benchmark's)
        env = dict(thread_env(), MASTER_PORT=str(free_port()))
        results["ours"] = run_side("ours", ours_command(paths, run_dir, args), os.path.join(run_dir, "metrics.jsonl"),
                                   args.out, args, env)  # fmt: skip
    if args.only != "ours":
        log = os.path.join(args.out, "trl", "metrics.jsonl")
        results["trl"] = run_side("trl", trl_command(paths, log, args), log, args.out, args, thread_env())
    info["load_after"] = os.getloadavg()
    with open(summary_path, "w") as f:
        json.dump({**results, "machine": info, "steps": args.steps, "eval_every": args.eval_every}, f, indent=1)
    if "ours" not in results or "trl" not in results:
        print(f"[vs_trl] one side only; figures in {summary_path}")
        return 0
    return print_table(results, info, args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``dapo-megatron`` command line.

    dapo-megatron config [--config X.yaml] [section.key=value ...]   print the resolved config
    dapo-megatron plot RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A B]  charts from metrics.jsonl
    dapo-megatron plan [--config X.yaml] [--engine-nodes N] [--model-preset P]  placement and memory dry-run
    dapo-megatron engines --plan P.json --config X.yaml [overrides]   serve this node's planned SGLang servers
    dapo-megatron train --config X.yaml [overrides]            DAPO training (torchrun / srun / one process)
    dapo-megatron demo [--config X.yaml] [overrides]           the embedded CPU demo, end to end
    dapo-megatron eval --model HF_DIR --config X.yaml          avg@k of an HF model on data.eval_files
    dapo-megatron export --ckpt C --hf-dir H --out O           a checkpoint to an HF folder

Each subcommand imports what it needs inside its handler, so ``--help`` and ``config`` stay fast
and never load megatron or an engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

from dapo_megatron.config import ConfigError
from dapo_megatron.errors import report_input_errors


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.clip_ratio_high=0.3")


def _cmd_config(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def _add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (or metrics.jsonl files) to overlay")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots of the first run)")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: folder names)")


def _cmd_plot(args: argparse.Namespace) -> int:
    from dapo_megatron.observability.plot import plot_run

    out = args.out or os.path.join(args.run_dirs[0], "plots")
    written = plot_run(args.run_dirs, out, labels=args.labels)
    if not written:
        print(f"dapo-megatron plot: no metrics to chart in {', '.join(args.run_dirs)}", file=sys.stderr)
        return 1
    print("\n".join(written))
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--engine-nodes",
        type=int,
        default=None,
        help="disaggregated mode: nodes serving engines (the last N of the allocation)",
    )
    p.add_argument("--gpus-per-node", type=int, default=None, help="override GPUs per node (else from SLURM)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    p.add_argument(
        "--model-preset",
        default=None,
        metavar="NAME",
        help="plan memory for a built-in shape (e.g. qwen3-30b-a3b) instead of model.hf_path/config.json",
    )
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU for the memory plan (80)")
    p.add_argument("--require-fit", action="store_true", help="exit 1 when the memory plan does not fit")


def _cmd_plan(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.placement import PlacementError, format_placement, plan_placement, save_placement
    from dapo_megatron.observability.memory_report import config_report

    cfg = load_config(args.config, args.overrides)
    try:
        plan = plan_placement(
            os.environ, cfg.rollout, cfg.parallel, gpus_per_node=args.gpus_per_node, engine_nodes=args.engine_nodes
        )
    except PlacementError as e:
        print(f"dapo-megatron plan: {e}", file=sys.stderr)
        return 2
    print(format_placement(plan))
    if args.json:
        save_placement(plan, args.json)
        _ensure_engine_key(os.path.dirname(os.path.abspath(args.json)), bool(plan.engines))
    lines, fits = ["memory plan: skipped, no GPUs in this allocation (--gpus-per-node G plans them)"], None
    if plan.gpus_per_node or args.model_preset:
        lines, fits = config_report(cfg, plan.trainer_world_size, args.model_preset, args.gpu_mem_gib)
    print("\n".join([""] + lines))
    return 1 if args.require_fit and fits is False else 0


def _ensure_engine_key(run_dir: str, has_engines: bool) -> None:
    """A per-job key for the engine servers and the router, next to the plan (mode 0600), made once."""
    from dapo_megatron.rollout.sglang_server import new_api_key, read_api_key

    if has_engines and read_api_key(run_dir) is None:
        new_api_key(run_dir)


def _add_engines_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--plan", required=True, metavar="PATH", help="placement.json written by `plan --json`")
    p.add_argument("--node", default=None, help="this node's name in the plan (default: SLURMD_NODENAME, hostname)")


def _cmd_engines(args: argparse.Namespace) -> int:
    import socket

    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.engine_node import serve_plan_on_node
    from dapo_megatron.controller.placement import PlacementError
    from dapo_megatron.rollout.sglang_server import SGLangStartError

    cfg = load_config(args.config, args.overrides)
    node = args.node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    try:
        return serve_plan_on_node(cfg, args.plan, node)
    except (PlacementError, SGLangStartError, FileNotFoundError, TimeoutError) as e:
        print(f"dapo-megatron engines: {e}", file=sys.stderr)
        return 1


DEMO_CONFIG = "examples/demo_cpu.yaml"
_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def _input_error(command: str, e: Exception) -> int:
    print(f"dapo-megatron {command}: error: {e}", file=sys.stderr)
    return 2


def _exit_on_sigterm() -> None:
    """SIGTERM (scancel, a parent stopping us) unwinds like an error, so the session's ``finally`` work
    runs: the SGLang servers this process started are stopped instead of outliving it."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _cmd_train(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.loop import train
    from dapo_megatron.controller.run_dir import RunDirError
    from dapo_megatron.controller.session import PeerStartError
    from dapo_megatron.parallel.init import RendezvousError

    _exit_on_sigterm()
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except (*_INPUT_ERRORS, RunDirError, RendezvousError, PeerStartError) as e:
        return _input_error("train", e)
    return 0


def _add_demo_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--assets-only", metavar="DIR", default=None,
                   help="only write the tiny model folder and problem files into DIR (for `train`)")  # fmt: skip


def _demo_config_path(path: Optional[str]) -> str:
    if path:
        return path
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEMO_CONFIG)
    return DEMO_CONFIG if os.path.isfile(DEMO_CONFIG) else here


def _cmd_demo(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.demo import run_demo, write_assets
    from dapo_megatron.controller.run_dir import RunDirError
    from dapo_megatron.parallel.init import RendezvousError

    _exit_on_sigterm()
    if args.assets_only:  # configs made for `train` on the assets name them as ${DEMO_ASSETS}
        os.environ.setdefault("DEMO_ASSETS", os.path.abspath(args.assets_only))
    cfg = load_config(_demo_config_path(args.config), args.overrides)
    try:
        if args.assets_only:
            print(write_assets(cfg, args.assets_only).model_dir)
            return 0
        summary = run_demo(cfg)
    except (*_INPUT_ERRORS, RunDirError, RendezvousError) as e:
        return _input_error("demo", e)
    print("demo summary: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--model", required=True, help="HF model folder (e.g. the output of `export`)")


def _cmd_eval(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.demo import eval_hf_folder

    cfg = load_config(args.config, args.overrides)
    try:
        result = eval_hf_folder(cfg, args.model)
    except _INPUT_ERRORS as e:
        return _input_error("eval", e)
    print(", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return 0


def _add_export_args(p: argparse.ArgumentParser) -> None:
    from dapo_megatron.weights.export_hf import add_export_args

    add_export_args(p)


def _cmd_export(args: argparse.Namespace) -> int:
    from dapo_megatron.weights.export_hf import run_export

    return run_export(args)


# name -> (help, add_arguments(parser), handler(args) -> exit code)
COMMANDS: Dict[str, tuple] = {
    "config": ("print the resolved config (defaults, YAML file, then overrides)", _add_config_args, _cmd_config),
    "plot": ("chart one or several runs from their metrics.jsonl", _add_plot_args, _cmd_plot),
    "plan": (
        "print where trainer ranks and engines go (dry run, from the SLURM/torchrun environment) and the "
        "per-GPU memory plan",
        _add_plan_args,
        _cmd_plan,
    ),
    "engines": (
        "serve the SGLang servers (and router) the saved plan puts on this node",
        _add_engines_args,
        _cmd_engines,
    ),
    "train": ("DAPO training from a config (one process, torchrun or srun)", _add_config_args, _cmd_train),
    "demo": ("the embedded CPU demo: warm-up, DAPO, export, eval", _add_demo_args, _cmd_demo),
    "eval": ("avg@k of an HF model folder on data.eval_files", _add_eval_args, _cmd_eval),
    "export": ("export a megatron checkpoint to an HF folder", _add_export_args, _cmd_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapo-megatron",
        description="DAPO reinforcement learning on megatron-core actors with SGLang / vLLM / embedded rollouts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _handler) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler: Callable[[argparse.Namespace], int] = COMMANDS[args.command][2]
    try:
        # Input errors (named where the input is read) end as one line and exit status 2.
        return report_input_errors(f"dapo-megatron {args.command}", lambda: handler(args))
    except ConfigError as e:
        print(f"dapo-megatron: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

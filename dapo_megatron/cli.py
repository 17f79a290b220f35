"""The ``dapo-megatron`` command line.

    dapo-megatron config [--config X.yaml] [section.key=value ...]   print the resolved config

Each subcommand imports what it needs inside its handler, so ``--help`` and ``config`` stay fast
and never load megatron or an engine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from dapo_megatron.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config file (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.clip_ratio_high=0.3")


def _cmd_config(args: argparse.Namespace) -> int:
    from dapo_megatron.config_io import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


# name -> (help, add_arguments(parser), handler(args) -> exit code)
COMMANDS: Dict[str, tuple] = {
    "config": ("print the resolved config (defaults, YAML file, then overrides)", _add_config_args, _cmd_config),
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
        return handler(args)
    except ConfigError as e:
        print(f"dapo-megatron: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

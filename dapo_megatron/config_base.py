"""The shared pieces of the configuration sections: the error type, the check helpers, constants.

Stdlib only, like every ``config*`` module: importing the config must stay cheap.
"""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the dotted key and what is allowed."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _refuse(problem: Optional[str]) -> None:
    """Raise a rule's problem line (``config_rules``) when there is one."""
    if problem:
        raise ConfigError(problem)


def _choice(value: object, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, allowed values are {', '.join(map(repr, allowed))}")


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
DTYPES = ("float32", "bfloat16", "float16")

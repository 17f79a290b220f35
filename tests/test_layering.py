"""The import rule: the light layers never pull in megatron, sglang or vllm; algo stays pure torch."""

import ast
import pathlib
import subprocess
import sys

import dapo_megatron.algo

LIGHT_MODULES = [
    "dapo_megatron",
    "dapo_megatron.algo",
    "dapo_megatron.rewards",
    "dapo_megatron.data",
    "dapo_megatron.config",
    "dapo_megatron.config_io",
    "dapo_megatron.types",
    "dapo_megatron.errors",
]

# A fresh interpreter, so modules other tests imported cannot hide (or fake) a violation.
PROBE = f"""
import importlib, sys
for name in {LIGHT_MODULES!r}:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'sglang', 'vllm'))
print('HEAVY:' + ','.join(heavy))
print('LOADED:' + ','.join(sorted(m for m in sys.modules if m.startswith('dapo_megatron'))))
"""


def test_light_layers_do_not_import_engines_or_megatron():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert lines["HEAVY"] == "", f"light layers imported {lines['HEAVY']}"
    # The probe really imported what it claims to check.
    assert set(LIGHT_MODULES) <= set(lines["LOADED"].split(","))


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _violations(source):
    """Imports of banned modules (anywhere, lazy ones included) and any ``torch.distributed`` use."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "__import__"):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("torch.distributed"):
            found.append(_dotted(node))
        found += [n for n in names if n.split(".")[0] in BANNED_ROOTS or n.startswith(BANNED_PREFIXES)]
    return found


BANNED_ROOTS = ("megatron", "sglang", "vllm")
BANNED_PREFIXES = ("torch.distributed", "dapo_megatron.config", "dapo_megatron.parallel", "dapo_megatron.megatron")


def test_violation_detector_catches_each_form():
    bad = [
        "import torch.distributed as dist",
        "from torch import distributed",
        "from megatron.core import mpu",
        "def f():\n    import sglang",
        "import importlib\nimportlib.import_module('vllm')",
        "import torch\ntorch.distributed.all_reduce(x)",
        "from dapo_megatron.config import AlgoConfig",
    ]
    for src in bad:
        assert _violations(src), src
    assert _violations('"""never torch.distributed or megatron"""\nimport torch\nx = torch.zeros(1)') == []


def test_algo_sources_stay_pure():
    # sys.modules cannot tell (torch itself imports torch.distributed), so read the sources.
    files = sorted(pathlib.Path(dapo_megatron.algo.__file__).parent.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        assert _violations(path.read_text()) == [], path.name

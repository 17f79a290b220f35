"""Packaging for dapo_megatron. Tool settings (ruff, pytest, mypy) live in pyproject.toml."""

from setuptools import find_packages, setup

# torch is deliberately a plain lower bound: install the build you want first (the CPU wheel on
# laptops and CI, CUDA on clusters), otherwise pip resolves a CUDA build of several GB.
CORE = ["torch>=2.6", "pyyaml>=6", "pyarrow>=14"]
CPU = [
    "megatron-core>=0.16.1",
    "psutil",  # megatron dist_checkpointing hangs on save without it, and does not declare it
    "transformers>=4.51",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "httpx>=0.27",
    "sglang-router==0.3.2",  # the router the SGLang adapter is tested against (tests/test_sglang_*.py)
    "tqdm>=4.66",
    "rich>=13",
    "matplotlib>=3.8",
    "nvidia-ml-py>=12",
]

setup(
    name="dapo_megatron",
    version="0.1.0",
    description="DAPO reinforcement learning for LLMs on megatron-core actors with SGLang/vLLM rollouts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dapo_megatron", "dapo_megatron.*"]),
    # Not a package: the sitecustomize that SGLang CPU servers load (rollout/sglang_server.py).
    package_data={"dapo_megatron.rollout": ["sglang_cpu_shim/sitecustomize.py"]},
    install_requires=CORE,
    extras_require={
        "cpu": CPU,
        "gpu": CPU + ["transformer-engine[pytorch]>=2.1"],
        "sglang": ["sglang==0.5.23", "sglang-router==0.3.2", "httpx>=0.27"],  # the pinned, tested versions
        "vllm": ["vllm>=0.11"],
        "math_verify": ["math-verify>=0.7"],
        "wandb": ["wandb>=0.19"],
        "test": CPU + ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "mypy>=1.10", "math-verify>=0.7", "wandb>=0.19"],
    },
    entry_points={"console_scripts": ["dapo-megatron=dapo_megatron.cli:main"]},
)

"""dapo_megatron: DAPO reinforcement learning on megatron-core actors with SGLang/vLLM/embedded rollouts.

Importing this package (or its ``algo``, ``rewards``, ``data`` and ``config`` modules) never imports
megatron, sglang or vllm; those load lazily in the layers that need them.
"""

__version__ = "0.1.0"

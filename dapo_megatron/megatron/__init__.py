"""The Megatron actor: model build from an HF config, vocab-parallel log-probs, schedule, optimizer, checkpoints.

Imports nothing on its own; import the submodules (they import megatron-core).
"""

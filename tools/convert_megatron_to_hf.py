#!/usr/bin/env python
"""Export a megatron dist checkpoint to an HF folder (same as ``dapo-megatron export``).

    python tools/convert_megatron_to_hf.py --ckpt runs/x/checkpoints/step_000100 --hf-dir Qwen2.5-7B \\
        --out exported/step_100 --dtype bfloat16

See :mod:`dapo_megatron.weights.export_hf` for the options and guarantees.
"""

import sys

from dapo_megatron.weights.export_hf import main

if __name__ == "__main__":  # megatron may start helper processes with spawn: keep this guard
    sys.exit(main())

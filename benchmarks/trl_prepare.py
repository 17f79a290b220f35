#!/usr/bin/env python
"""The shared start of ``benchmarks/vs_trl.py``: one warm-up, one exported model, one set of prompts.

    python benchmarks/trl_prepare.py --out runs/vs_trl [--config examples/demo_cpu.yaml] [overrides]

Runs in the project's venv, once per output folder (each stage is skipped when its output exists):

1. the demo's assets (tokenizer + tiny Qwen2 config, train/held-out problems) and its supervised
   warm-up (``controller/demo.py``: ``write_assets``, ``sft_warmup``), exactly as ``dapo-megatron demo``;
2. the warm-up checkpoint exported as an HF folder with the tokenizer, ``OUT/warmup_hf``: the one model
   both systems start from (TRL loads it with ``from_pretrained``);
3. that folder converted back into a megatron checkpoint, ``OUT/warmup_mcore``
   (``tools/convert_hf_to_megatron.py``; float32 both ways, so bit for bit the warm-up's weights):
   this project's run loads it as ``model.load``, with ``model.hf_path=OUT/warmup_hf``;
4. ``OUT/prompts_{train,eval}.jsonl``: each problem's chat messages, this project's prompt token ids
   and the ground truth, so the TRL run can check that it feeds the model the same tokens.

Prints one JSON line with the paths (the orchestrator reads the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "demo_cpu.yaml")


def write_prompts(cfg, tokenizer, files: List[str], out: str) -> int:
    """One JSON line per row: ``messages``, ``prompt_ids`` (this project's tokenization), ``ground_truth``."""
    from dapo_megatron.controller.prompts import load_prompts

    data, ids = load_prompts(files, tokenizer, cfg)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for i in range(len(data)):
            row = data[i]
            f.write(json.dumps({"messages": list(row.messages), "prompt_ids": ids[i],
                                "ground_truth": row.ground_truth}) + "\n")  # fmt: skip
    os.replace(tmp, out)
    return len(data)


def prepare(out: str, config: str, overrides: List[str]) -> Dict[str, str]:
    """Stages 1-4 above into ``out``; returns the paths (keys: model, mcore, train, eval, prompts_*)."""
    from transformers import AutoTokenizer

    from dapo_megatron.config_io import load_config
    from dapo_megatron.controller.demo import export_checkpoint, sft_warmup, with_assets, write_assets

    cfg = load_config(config, overrides)
    assets = write_assets(cfg, os.path.join(out, "assets"))
    demo_cfg = with_assets(cfg, assets)
    sft = os.path.join(out, "assets", "sft")
    if not os.path.isfile(os.path.join(sft, "meta.json")):
        sft_warmup(demo_cfg, sft, progress=False)
    hf_dir, mcore = os.path.join(out, "warmup_hf"), os.path.join(out, "warmup_mcore")
    export_checkpoint(demo_cfg, sft, hf_dir)  # atomic; kept when it exists
    if not os.path.isdir(mcore):  # the converter writes <out>.tmp-* and renames: a folder is complete
        cmd = [sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"), "--hf-dir", hf_dir,
               "--out", mcore]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    paths = {"model": hf_dir, "mcore": mcore, "train": assets.train_file, "eval": assets.eval_file}
    for split, files in (("train", [assets.train_file]), ("eval", [assets.eval_file])):
        paths[f"prompts_{split}"] = os.path.join(out, f"prompts_{split}.jsonl")
        write_prompts(demo_cfg, tokenizer, files, paths[f"prompts_{split}"])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (reused: finished stages are skipped)")
    p.add_argument("--config", default=DEMO_CONFIG, help="the demo config (default: examples/demo_cpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as for dapo-megatron demo")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps(prepare(os.path.abspath(args.out), args.config, args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

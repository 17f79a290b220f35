"""controller/heap.py: the loop's per-step ``malloc_trim`` really gives freed heap pages back.

The measurement runs in a fresh interpreter: inside the long pytest process the heap is already
fragmented by earlier tests, so where new blocks land (and whether ``free`` alone can shrink the
heap) depends on test order. A fresh process has one known layout: the blocks, then the pin above.
"""

import json
import subprocess
import sys

from dapo_megatron.controller import heap

_PROBE = """
import gc, json, psutil, torch
from dapo_megatron.controller import heap

def rss():
    return psutil.Process().memory_info().rss

blocks = [torch.ones(16384) for _ in range(1500)]  # 64 KiB each, ~96 MiB, under the mmap threshold
pin = torch.ones(16384)  # allocated after them: the heap's top stays in use, so free() cannot shrink it
grown = rss()
del blocks
gc.collect()
kept = rss()
released = heap.release_free_heap()
print(json.dumps({"grown": grown, "kept": kept, "trimmed": rss(), "released": released}))
del pin
"""


def test_freed_tensors_below_a_live_one_go_back_to_the_os_only_after_the_trim():
    assert heap._libc() is not None, "the CI machines run glibc"
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert rss["kept"] > rss["grown"] - 32 * mib, rss  # freed, but still the process's pages
    assert rss["released"], rss
    assert rss["trimmed"] < rss["kept"] - 64 * mib, rss

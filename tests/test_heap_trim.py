"""controller/heap.py: the loop's per-step ``malloc_trim`` really gives freed heap pages back."""

import gc

import psutil
import torch

from dapo_megatron.controller import heap


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_freed_tensors_below_a_live_one_go_back_to_the_os_only_after_the_trim():
    assert heap._libc() is not None, "the CI machines run glibc"
    blocks = [torch.ones(16384) for _ in range(1500)]  # 64 KiB each, ~96 MiB, under the mmap threshold: the heap
    pin = torch.ones(16384)  # allocated after them: the heap's top stays in use, so free() cannot shrink it
    grown = _rss()
    del blocks
    gc.collect()
    kept = _rss()
    assert kept > grown - 32 * 2**20  # freed, but still the process's pages
    assert heap.release_free_heap()
    assert _rss() < kept - 64 * 2**20
    del pin

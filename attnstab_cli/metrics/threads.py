"""Run batched small dense factorizations on one thread.

torch parallelises a stack of small LAPACK calls (QR, SVD, eigvalsh of [..., 256, 64] or 64 × 64 blocks) over the
batch with OpenMP. On a 2-core machine that was 100× slower than one thread (a [4, 9, 256, 64] float64 QR: 1.26 s
with 2 threads, 0.010 s with 1), while large matmuls gain from every thread; so only these calls drop to one
thread, and the caller's setting comes back afterwards (``bench/results/scan_threads_cpu.json``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """``torch.set_num_threads(1)`` for the block, restoring the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

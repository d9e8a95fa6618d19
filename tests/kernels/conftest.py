"""Kernel tests run the Triton kernels on CPU through the interpreter unless TRITON_INTERPRET is already set.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so this must run before any kernel module is
imported (STYLE.md, Kernels). Set TRITON_INTERPRET=0 on a CUDA machine to run the same tests compiled.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

"""The only importer of ``attnstab_kernels``: choose the fused Triton kernel or the chunked torch reference.

``--kernel auto`` uses Triton on CUDA and the torch path on CPU; ``--kernel triton`` on a CPU works only under
``TRITON_INTERPRET=1`` (how the kernel tests run). Both paths return the same :class:`RowStats`. Soft-capped
logits (THEORY §18.5) always take the torch path: the fused kernel computes plain ``scale · q·k``. Sink logits
(§18.4) take either path: both stream the keys alone and map the rows with ``apply_sinks``.
"""
from __future__ import annotations

import os

import torch

from attnstab_cli.errors import UsageError
from attnstab_cli.reference.row_stats import RowStats, attn_row_stats_ref

KERNELS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(name: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA with Triton installed, else ``torch``; impossible requests are usage errors."""
    if name not in KERNELS:
        raise UsageError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise UsageError("--kernel triton: Triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--kernel triton needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)")
    return name


def attn_row_stats(q: torch.Tensor, k: torch.Tensor, scale: float, *, causal: bool,
                   key_padding_mask: torch.Tensor | None, window: int | None, kernel: str,
                   logit_cap: float | None = None, sinks: torch.Tensor | None = None) -> RowStats:
    """Per-row softmax statistics ``[B, H, T_q]`` by the resolved ``kernel`` (``torch`` or ``triton``); with a
    ``logit_cap`` always the torch reference; ``sinks [H]`` a sink logit per query head (§18.4)."""
    if logit_cap is not None:
        return attn_row_stats_ref(q, k, scale, causal=causal, key_padding_mask=key_padding_mask, window=window,
                                  logit_cap=logit_cap, sinks=sinks)
    if kernel == "triton":
        from attnstab_kernels.row_stats import attn_row_stats as fused

        return fused(q, k, scale, causal=causal, key_padding_mask=key_padding_mask, window=window, sinks=sinks)
    return attn_row_stats_ref(q, k, scale, causal=causal, key_padding_mask=key_padding_mask, window=window,
                              sinks=sinks)

"""Per-head views of projection matrices, for the Lipschitz bounds (THEORY §5.2) and the weight columns (§15).

Matrix norms come from ``metrics/spectral.py`` (certified upper values). Row
convention: ``W [d_in, d_out]`` acts as ``x -> xW``.
"""
from __future__ import annotations

import torch


def head_slices(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Column blocks of ``w [d, n_heads*D]`` as a stack ``[n_heads, d, D]`` (one head's projection each)."""
    d, width = w.shape
    return w.to(torch.float64).reshape(d, n_heads, width // n_heads).permute(1, 0, 2)

"""Float64 matrix norms used by the Lipschitz bounds (THEORY §5.2, §6).

Kept private to this subpackage so the bounds are self-contained; ``metrics/spectral.py`` offers certified versions
for large matrices and the two can be unified later. Row convention: ``W [d_in, d_out]`` acts as ``x -> xW``.
"""
from __future__ import annotations

import torch


def spectral_norm(w: torch.Tensor) -> torch.Tensor:
    """``||W||_2`` of ``w [..., m, n]`` in float64 (SVD based): ``[...]``."""
    return torch.linalg.matrix_norm(w.to(torch.float64), ord=2)


def norm_2_to_inf(w: torch.Tensor) -> torch.Tensor:
    """``||W||_{2->inf}`` for ``x -> xW``: the largest column l2 norm of ``w [..., d, m]`` (THEORY §6.2): ``[...]``."""
    return torch.linalg.vector_norm(w.to(torch.float64), dim=-2).amax(dim=-1)


def head_slices(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Column blocks of ``w [d, n_heads*D]`` as a stack ``[n_heads, d, D]`` (one head's projection each)."""
    d, width = w.shape
    return w.to(torch.float64).reshape(d, n_heads, width // n_heads).permute(1, 0, 2)

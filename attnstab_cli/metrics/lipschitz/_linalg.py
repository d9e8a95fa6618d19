"""Per-head views of projection matrices, for the Lipschitz bounds (THEORY §5.2) and the weight columns (§15).

Matrix norms come from ``metrics/spectral.py`` (certified upper values). Row
convention: ``W [d_in, d_out]`` acts as ``x -> xW``.
"""
from __future__ import annotations

import torch

from attnstab_cli.metrics.spectral import shared


def head_slices(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Column blocks of ``w [d, n_heads*D]`` as a float64 stack ``[n_heads, d, D]`` (one head's projection each).

    Within a :func:`~attnstab_cli.metrics.spectral.shared_spectra` block every caller gets the same stack, so its
    singular values are computed once for the weight columns and the Lipschitz head norms."""
    d, width = w.shape
    return shared(("head_slices", n_heads), w,
                  lambda: w.to(torch.float64).reshape(d, n_heads, width // n_heads).permute(1, 0, 2))


def head_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Row blocks of ``w [n_heads*D, d]`` (the output projection) as a float64 stack ``[n_heads, D, d]``, shared
    like :func:`head_slices`."""
    return shared(("head_rows", n_heads), w, lambda: w.to(torch.float64).reshape(n_heads, w.shape[0] // n_heads, -1))

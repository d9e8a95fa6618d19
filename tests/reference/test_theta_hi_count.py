"""The cardinality upper bound on θ (``compute_theta_hi_count``) against exhaustive θ, and its tight case."""
from __future__ import annotations

import itertools

import torch

from attnstab_cli.reference.row_stats import compute_theta_hi_count


def exhaustive_theta(p: torch.Tensor) -> float:
    """4 max_S p(S)(1 − p(S)) over all subsets, float64 (n ≤ 12)."""
    best = 0.0
    for bits in itertools.product((0, 1), repeat=p.numel()):
        m = float((p * torch.tensor(bits, dtype=torch.float64)).sum())
        best = max(best, 4.0 * m * (1.0 - m))
    return best


def bound(p: torch.Tensor) -> float:
    return float(compute_theta_hi_count(p.max()[None], p.min()[None], torch.tensor([p.numel()]))[0])


def test_never_below_exhaustive_theta() -> None:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(600):
        n = 2 + trial % 11
        spread = (0.001, 0.05, 0.3, 1.0, 3.0)[trial % 5]
        p = torch.softmax(torch.randn(n, generator=gen, dtype=torch.float64) * spread, 0)
        hi = bound(p)
        assert hi >= exhaustive_theta(p) - 1e-15
        checked += hi < 1.0
    assert checked > 100                       # the bound is informative on many rows, not just 1


def test_pins_uniform_rows_with_an_odd_count() -> None:
    for n in (3, 5, 21, 257, 1025):
        p = torch.full((n,), 1.0 / n, dtype=torch.float64)
        assert abs(bound(p) - (1.0 - 1.0 / n**2)) < 1e-12
    for n in (2, 4, 256):                       # even: a perfect split exists, θ = 1
        assert bound(torch.full((n,), 1.0 / n, dtype=torch.float64)) == 1.0

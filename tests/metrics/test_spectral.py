"""Spectral norms with certificates, condition numbers and 2->inf norms (THEORY §1.2 / T12, §6.2, §13, §14).

The power path is forced with ``exact_max_dim=0`` so that it runs on small matrices and can be compared with
``torch.linalg.matrix_norm(ord=2)``: its value must never exceed the truth and never fall more than ``rtol`` below it,
and its upper bound must never fall below the truth.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnstab_cli.metrics.spectral import (
    condition_number, gram_upper_bound, norm_2_to_inf, power_iteration, relative_gap, singular_values,
    shared_spectra, smallest_singular_value, spectral_norm, spectral_norm_value,
)

F64 = torch.float64
ROUND = 1e-12   # float64 rounding allowance for "never above" / "never below"


def _with_singular_values(m: int, n: int, s: list[float], seed: int) -> torch.Tensor:
    """A random ``[m, n]`` matrix with prescribed singular values ``s`` (len <= min(m, n), rest zero)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    sig = torch.zeros(m, n, dtype=F64)
    sig[range(len(s)), range(len(s))] = torch.tensor(s, dtype=F64)
    return u @ sig @ v.T


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(3, 40, 3, generator=g, dtype=F64) @ torch.randn(3, 3, 25, generator=g, dtype=F64)
    return {
        "random_tall": torch.randn(4, 50, 20, generator=g, dtype=F64),
        "random_wide": torch.randn(4, 20, 50, generator=g, dtype=F64),
        "square_batch_dims": torch.randn(2, 3, 16, 16, generator=g, dtype=F64),
        "rank_deficient": low_rank,
        "repeated_top": torch.stack([_with_singular_values(30, 24, [5, 5, 5, 4.9, 1, 0.5], seed) for seed in range(3)]),
        "close_top": _with_singular_values(24, 30, [2.0, 2.0 - 1e-7, 1.0], 7),
        "zero_and_rank_one": torch.stack([torch.zeros(8, 5, dtype=F64), torch.outer(torch.arange(8.0), torch.ones(5))
                                          .to(F64)]),
        "float32_input": torch.randn(30, 12, generator=g),
    }


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("rtol", [1e-4, 1e-8])
def test_power_path_brackets_exact_norm(name: str, rtol: float) -> None:
    w = _cases()[name]
    exact = torch.linalg.matrix_norm(w.to(F64), ord=2)
    est = spectral_norm(w, rtol=rtol, exact_max_dim=0)
    assert est.method == "power"
    assert est.value.shape == exact.shape and est.value.dtype == F64
    assert bool(est.certified.all())
    assert bool((est.value <= exact * (1 + ROUND) + 1e-300).all()), "power iteration overshot sigma_max"
    assert bool((est.value >= exact * (1 - rtol) - ROUND).all()), "value more than rtol below sigma_max"
    assert bool((est.upper >= exact * (1 - ROUND)).all()), "upper bound below sigma_max"
    assert bool((est.upper <= exact * (1 + rtol) * (1 + 1e-9) + 1e-300).all())
    assert bool((relative_gap(est) <= rtol * (1 + 1e-9)).all())


@pytest.mark.parametrize("name", list(_cases()))
def test_exact_path_matches_matrix_norm(name: str) -> None:
    w = _cases()[name]
    exact = torch.linalg.matrix_norm(w.to(F64), ord=2)
    est = spectral_norm(w)
    assert est.method == "svd" and bool(est.certified.all())
    torch.testing.assert_close(est.value, exact, rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(est.upper, est.value, rtol=0, atol=0)
    torch.testing.assert_close(spectral_norm_value(w), exact, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("shape", [(128, 128), (192, 576), (1536, 200), (2, 256, 130)])
def test_gram_path_brackets_exact_norm(shape: tuple[int, ...]) -> None:
    """Medium matrices take the Gram eigenvalue path: ``value <= sigma_max <= upper``, ~1e-10 apart, unless the SVD
    of the same tensor is already shared, which then serves the norm exactly."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g, dtype=F64) * torch.logspace(-3, 0, shape[-1], dtype=F64)
    exact = torch.linalg.matrix_norm(w, ord=2)
    est = spectral_norm(w)
    assert est.method == "gram" and bool(est.certified.all())
    assert bool((est.value <= exact * (1 + ROUND)).all()) and bool((est.upper >= exact * (1 - ROUND)).all())
    assert bool((est.upper <= exact * (1 + 1e-9)).all()) and bool((est.value >= exact * (1 - 1e-9)).all())
    with shared_spectra():
        singular_values(w)
        shared = spectral_norm(w)
    assert shared.method == "svd"
    torch.testing.assert_close(shared.value, exact, rtol=1e-13, atol=0)


def test_power_iteration_is_a_lower_bound_and_converges_on_a_gap() -> None:
    w = _with_singular_values(60, 40, [3.0, 1.5, 1.0, 0.1], 3).unsqueeze(0)
    lo, v, iters = power_iteration(w, rtol=1e-12, max_iter=200)
    assert lo.item() <= 3.0 * (1 + ROUND)
    assert lo.item() == pytest.approx(3.0, rel=1e-10)
    assert 1 < iters <= 200 and v.shape == (1, 40)
    few, _, one = power_iteration(w, rtol=0.0, max_iter=1)
    assert one == 1 and few.item() <= 3.0 * (1 + ROUND)


def test_gram_certificate_improves_a_poor_lower_bound() -> None:
    """Starting from a useless lower bound, the squarings alone reach the tolerance (accelerated power)."""
    w = _with_singular_values(20, 20, [1.0, 0.999, 0.5], 5).unsqueeze(0)
    lo, hi, squarings = gram_upper_bound(w, torch.zeros(1, dtype=F64), rtol=1e-6)
    assert 0 < squarings <= 40
    assert lo.item() <= 1.0 * (1 + ROUND) <= hi.item() * (1 + ROUND)
    assert hi.item() <= lo.item() * (1 + 1e-6)


def test_uncertified_mode_still_gives_a_rigorous_upper_bound() -> None:
    w = _cases()["random_tall"]
    exact = torch.linalg.matrix_norm(w, ord=2)
    est = spectral_norm(w, exact_max_dim=0, certify=False, max_iter=3)
    assert est.squarings == 0
    assert bool((est.upper >= exact * (1 - ROUND)).all()) and bool((est.value <= exact * (1 + ROUND)).all())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_power_path_property(m: int, n: int, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r = min(rank, m, n)
    w = torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
    exact = torch.linalg.matrix_norm(w, ord=2)
    est = spectral_norm(w, rtol=1e-6, exact_max_dim=0)
    assert bool(est.certified)
    assert exact * (1 - 1e-6) - ROUND <= est.value <= exact * (1 + ROUND) + 1e-300
    assert est.upper >= exact * (1 - ROUND)


def test_condition_number_and_sigma_min_match_svdvals() -> None:
    g = torch.Generator().manual_seed(1)
    for shape in [(5, 30, 8), (5, 8, 30), (3, 12, 12)]:
        w = torch.randn(*shape, generator=g, dtype=F64)
        s = torch.linalg.svdvals(w)                                        # [N, min(m, n)]
        torch.testing.assert_close(singular_values(w), s, rtol=1e-13, atol=0)
        torch.testing.assert_close(smallest_singular_value(w), s[:, -1], rtol=1e-12, atol=0)
        torch.testing.assert_close(condition_number(w), s[:, 0] / s[:, -1], rtol=1e-12, atol=0)
        torch.testing.assert_close(condition_number(w, 1e-6), s[:, 0] / (s[:, -1] + 1e-6), rtol=1e-12, atol=0)
        torch.testing.assert_close(condition_number(w), torch.linalg.cond(w, p=2), rtol=1e-10, atol=0)


def test_condition_number_counts_only_min_m_n_values_and_rank_deficiency() -> None:
    wide = _with_singular_values(3, 10, [4.0, 2.0, 0.5], 0)               # 3 values, no zero padding
    assert condition_number(wide).item() == pytest.approx(8.0, rel=1e-12)
    singular = torch.zeros(6, 4, dtype=F64)
    singular[0, 0] = singular[1, 1] = 1.0                                  # sigma = (1, 1, 0, 0) exactly
    assert condition_number(singular).item() == float("inf")
    assert condition_number(singular, 1e-6).item() == pytest.approx(1.0 / 1e-6, rel=1e-6)


def test_norm_2_to_inf_is_max_column_norm_and_tight() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 7, 11, generator=g, dtype=F64)
    expected = torch.stack([max(w[b, :, k].norm() for k in range(11)) for b in range(2)])
    torch.testing.assert_close(norm_2_to_inf(w), expected, rtol=1e-14, atol=0)
    x = torch.randn(100, 7, generator=g, dtype=F64)
    assert bool(((x @ w[0]).abs().amax(-1) <= x.norm(dim=-1) * norm_2_to_inf(w[0]) * (1 + ROUND)).all())
    k = int(w[0].norm(dim=0).argmax())
    x_star = w[0, :, k] / w[0, :, k].norm()                                # attains the bound
    assert (x_star @ w[0]).abs().max().item() == pytest.approx(norm_2_to_inf(w[0]).item(), rel=1e-13)


@pytest.mark.parametrize("d_in,d_out", [(16, 4), (4, 16), (12, 12)])
def test_t12_rms_rule(d_in: int, d_out: int) -> None:
    """T12: ||XW||_{inf,RMS} <= ||W||_2 sqrt(d_in/d_out) ||X||_{inf,RMS}, equality at the top singular direction."""
    g = torch.Generator().manual_seed(d_in * 100 + d_out)
    w = torch.randn(d_in, d_out, generator=g, dtype=F64)
    norm = spectral_norm_value(w).item()
    rms_inf = lambda x: (x.norm(dim=-1) / x.shape[-1] ** 0.5).max().item()
    factor = norm * (d_in / d_out) ** 0.5
    x = torch.randn(64, d_in, generator=g, dtype=F64)
    assert rms_inf(x @ w) / (factor * rms_inf(x)) <= 1 + ROUND
    u, _, _ = torch.linalg.svd(w)                                          # row convention: x = u_1^T
    x_star = u[:, 0].unsqueeze(0)
    assert rms_inf(x_star @ w) / (factor * rms_inf(x_star)) == pytest.approx(1.0, abs=1e-12)


def test_empty_and_vector_inputs() -> None:
    assert spectral_norm(torch.zeros(0, 3, 3)).value.shape == (0,)
    with pytest.raises(ValueError):
        spectral_norm(torch.ones(3))


@pytest.mark.parametrize("shape", [(160, 700), (700, 160), (200, 200), (64, 300)])
def test_extreme_singular_values_match_svdvals(shape: tuple[int, int]) -> None:
    """The Gram path's sigma_min and sigma_max (upper) agree with the SVD to its certified rtol, on random and on
    graded spectra; below GRAM_MIN_DIM the SVD itself is used."""
    from attnstab_cli.metrics.spectral import extreme_singular_values

    g = torch.Generator().manual_seed(sum(shape))
    for spread in (1.0, 1e-2):
        u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))
        s = torch.logspace(0, math.log10(spread), min(shape), dtype=torch.float64) * 3.0
        w = u @ torch.diag(s) @ v.T
        got = extreme_singular_values(w)
        exact = torch.linalg.svdvals(w)
        assert exact[0] * (1 - 1e-14) <= got[0] <= exact[0] * (1 + 1e-9)      # an upper value, r n eps above
        assert float(got[1]) == pytest.approx(float(exact[-1]), rel=1e-6)


def test_extreme_singular_values_fall_back_to_the_svd_when_nearly_singular() -> None:
    """A sigma_min far below the Gram bracket's error (1e-9 of sigma_max) comes from the SVD, not the bracket."""
    from attnstab_cli.metrics.spectral import extreme_singular_values

    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(300, 150, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    s = torch.ones(150, dtype=torch.float64)
    s[-1] = 1e-9
    w = u @ torch.diag(s) @ v.T
    got = extreme_singular_values(w)
    assert float(got[1]) == pytest.approx(1e-9, rel=1e-5)          # the Gram eigenvalue would be ~1e-16 +- 1e-13


def test_the_gram_spectrum_is_shared_between_the_norm_and_the_extremes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one shared_spectra block sigma_max's bracket and the extreme singular values of one matrix come from
    one eigvalsh of its Gram matrix, and agree with the SVD."""
    from attnstab_cli.metrics.spectral import extreme_singular_values, shared_spectra, spectral_norm

    calls = []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda a: calls.append(a.shape) or eigvalsh(a))
    w = torch.randn(300, 160, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # the Gram path
    with shared_spectra():
        ext = extreme_singular_values(w)
        est = spectral_norm(w)
    assert len(calls) == 1 and est.method == "gram"
    s = torch.linalg.svdvals(w)
    assert float(est.upper) == float(ext[0]) and abs(float(ext[0]) - float(s[0])) <= 1e-9 * float(s[0])
    assert abs(float(ext[1]) - float(s[-1])) <= 1e-6 * float(s[-1])

"""Tests of the per-(layer, head) aggregation (THEORY §3.8): T10 merge exactness and percentile brackets, T11 causal
rows and the min_keys rule, bin rules and report columns."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnstab_cli.metrics.aggregate import (
    COLUMNS,
    DEFAULT_MIN_KEYS,
    HeadAggregate,
    compute_linear_bins,
    compute_log_bins,
    compute_nearest_rank,
    compute_percentile_bracket,
    linear_bin_edges,
)
from attnstab_cli.metrics.theta import compute_pmax_entropy, compute_theta_interval, compute_theta_paper

F64 = torch.float64
H = 4
EXACT_FIELDS = ("n_rows", "n_rows_short", "log_hist", "theta_tilde_lo", "theta_tilde_hi", "theta_width_max",
                "theta_exact_count", "peaked_count")
MOMENTS = ("theta_lo", "theta_hi", "pmax", "entropy_norm")
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def _synthetic_rows(seed: int, rows: int) -> dict[str, torch.Tensor]:
    """Per-row statistics with values on bin edges, at exactly 0 and 1, near 1 and uniform; n_keys 1..64."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 4, (rows,), generator=g)
    uniform = torch.rand(rows, generator=g, dtype=F64)
    edge = torch.randint(0, 1001, (rows,), generator=g).to(F64) / 1000
    near_one = 1.0 - 10.0 ** -(16 * torch.rand(rows, generator=g, dtype=F64))
    ones = torch.ones(rows, dtype=F64)
    lo = torch.stack([uniform, edge, near_one, ones], -1).gather(1, kind[:, None])[:, 0]
    width = torch.where(torch.rand(rows, generator=g) < 0.5, 0.0, 1e-3 * torch.rand(rows, generator=g, dtype=F64))
    n_keys = torch.randint(1, 65, (rows,), generator=g)
    return {
        "head": torch.randint(0, H, (rows,), generator=g),
        "theta_lo": lo, "theta_hi": (lo + width).clamp(max=1.0),
        "pmax": torch.rand(rows, generator=g, dtype=F64),
        "entropy": torch.rand(rows, generator=g, dtype=F64) * torch.log(n_keys.to(F64)),
        "n_keys": n_keys, "theta_paper": lo * torch.rand(rows, generator=g, dtype=F64),
    }


def _aggregate(rows: dict[str, torch.Tensor], index: torch.Tensor | slice = slice(None)) -> HeadAggregate:
    agg = HeadAggregate.create(H)
    head = rows["head"][index]
    agg.update(head, **{k: v[index] for k, v in rows.items() if k != "head"})
    return agg


def _true_quantile(values: torch.Tensor, q: float) -> float:
    """Nearest-rank quantile: the k-th smallest value, k = max(1, ceil(qN)) (q as a decimal)."""
    k = int(compute_nearest_rank(torch.tensor([values.numel()]), q))
    return float(values.sort().values[k - 1])


# ---------------------------------------------------------------- T10: merging and percentiles

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t10_random_splits_merge_to_the_global_result(seed: int) -> None:
    rows = _synthetic_rows(seed, 3000)
    whole = _aggregate(rows)
    g = torch.Generator().manual_seed(100 + seed)
    order = torch.randperm(3000, generator=g)
    cuts = sorted(torch.randint(0, 3000, (9,), generator=g).tolist())
    parts = [_aggregate(rows, idx) for idx in torch.tensor_split(order, cuts)]
    while len(parts) > 1:                                                  # merge in a random tree order
        i = int(torch.randint(0, len(parts) - 1, (1,), generator=g))
        parts[i:i + 2] = [parts[i].merge(parts[i + 1])]
    merged = parts[0]
    for name in EXACT_FIELDS:
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    for name in MOMENTS:
        a, b = getattr(merged, name), getattr(whole, name)
        for field in ("count", "minimum", "maximum", "hist"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
        for field in ("total", "total_sq"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-12, atol=0.0)
    for name in ("theta_paper_sum", "entropy_sum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=0.0)
    for q in QUANTILES:
        for x, y in zip(merged.compute_theta_percentile(q), whole.compute_theta_percentile(q)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("seed", [0, 3])
def test_t10_percentile_brackets_contain_the_nearest_rank_quantile(seed: int) -> None:
    rows = _synthetic_rows(seed, 2000)
    agg = _aggregate(rows)
    long = rows["n_keys"] >= agg.min_keys
    for q in QUANTILES:
        lo, hi, mid = agg.compute_theta_percentile(q)
        for h in range(H):
            values = rows["theta_lo"][long & (rows["head"] == h)]
            true = _true_quantile(values, q)
            assert float(lo[h]) <= true <= float(hi[h]), (q, h)
            assert float(hi[h] - lo[h]) <= 1e-3 + 1e-15 and float(lo[h]) <= float(mid[h]) <= float(hi[h])
        pm_lo, pm_hi = compute_percentile_bracket(agg.pmax.hist, q, agg.pmax.minimum, agg.pmax.maximum,
                                                  *linear_bin_edges())
        for h in range(H):
            true = _true_quantile(rows["pmax"][long & (rows["head"] == h)], q)
            assert float(pm_lo[h]) <= true <= float(pm_hi[h])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 0.999, 0.001, 1 - 2**-52])),
                min_size=1, max_size=60), st.sampled_from(QUANTILES))
def test_property_bracket_contains_quantile(values: list[float], q: float) -> None:
    x = torch.tensor(values, dtype=F64)
    agg = HeadAggregate.create(1, min_keys=0)
    agg.update(torch.zeros(x.numel(), dtype=torch.int64), theta_lo=x, theta_hi=x, pmax=x, entropy=x,
               n_keys=torch.full_like(x, 2, dtype=torch.int64), theta_paper=x)
    lo, hi, _ = agg.compute_theta_percentile(q)
    assert float(lo) <= _true_quantile(x, q) <= float(hi)


def test_nearest_rank_is_exact_in_integers() -> None:
    n = torch.tensor([0, 1, 20, 60, 99, 100, 101])
    assert compute_nearest_rank(n, 0.05).tolist() == [1, 1, 1, 3, 5, 5, 6]
    assert compute_nearest_rank(n, 0.5).tolist() == [1, 1, 10, 30, 50, 50, 51]
    assert compute_nearest_rank(n, 1.0).tolist() == [1, 1, 20, 60, 99, 100, 101]
    with pytest.raises(ValueError):
        compute_nearest_rank(n, 1.5)


def test_bin_rules() -> None:
    x = torch.tensor([0.0, 0.0004, 0.001, 0.5, 0.9995, 1.0], dtype=F64)
    assert compute_linear_bins(x).tolist() == [0, 0, 1, 500, 999, 999]
    theta = torch.tensor([0.0, 0.5, 0.75, 1 - 2.0**-40, 1 - 2.0**-52, 1.0], dtype=F64)
    assert compute_log_bins(theta).tolist() == [0, 3, 6, 120, 156, 159]


# ---------------------------------------------------------------- T11: causal rows and min_keys

def _row_stats(p: torch.Tensor) -> dict[str, torch.Tensor]:
    iv = compute_theta_interval(p, slack=0.0)
    return {"theta_lo": iv.lo, "theta_hi": iv.hi, "pmax": iv.pmax, "entropy": compute_pmax_entropy(p).entropy,
            "n_keys": iv.n_keys, "theta_paper": compute_theta_paper(p), "exact": iv.exact}


def test_t11_causal_uniform_rows() -> None:
    t = 48
    p = torch.tril(torch.ones(t, t, dtype=F64))
    p = p / p.sum(-1, keepdim=True)                                        # row i: uniform on i + 1 keys
    stats = _row_stats(p)
    assert float(stats["theta_lo"][0]) == 0.0 and float(stats["theta_hi"][0]) == 0.0
    keys = torch.arange(1, t + 1, dtype=F64)
    want = 1.0 - (keys % 2) / keys**2
    assert (stats["theta_lo"] - want).abs().max() <= 1e-14
    assert bool((stats["theta_hi"] >= want - 1e-15).all())
    agg = HeadAggregate.create(1, min_keys=16)
    agg.update(torch.zeros(t, dtype=torch.int64), **stats)
    out = agg.finalize()
    assert out["n_rows"] == [t - 15] and out["n_rows_short"] == [15]
    assert out["theta_lo_min"][0] == pytest.approx(float(want[16:].min()), abs=1e-14)
    assert out["theta_tilde_lo"] == [1.0]
    assert int(agg.theta_lo.hist.sum()) == t - 15 and int(agg.log_hist.sum()) == t - 15
    assert out["theta_mean"][0] == pytest.approx(float(want[15:].mean()), abs=1e-14)


def test_t11_short_rows_count_only_in_theta_tilde() -> None:
    short = torch.zeros(3, 40, dtype=F64)
    short[:, :4] = 0.25                                                    # θ = 1 on 4 keys
    long_rows = torch.full((5, 40), 0.1 / 39, dtype=F64)
    long_rows[:, 0] = 0.9                                                  # peaked: θ = 0.36
    stats = _row_stats(torch.cat([short, long_rows]))
    agg = HeadAggregate.create(2, min_keys=16)
    agg.update(torch.tensor([1] * 8), **stats)
    out = agg.finalize()
    assert out["n_rows"] == [0, 5] and out["n_rows_short"] == [0, 3]
    assert out["theta_tilde_lo"][1] == pytest.approx(1.0) and out["theta_tilde_hi"][1] == pytest.approx(1.0)
    assert out["theta_lo_min"][1] == pytest.approx(0.36) and out["theta_mean"][1] == pytest.approx(0.36)
    assert out["peaked_frac"] == [None, 1.0] and out["pmax_max"][1] == pytest.approx(0.9)
    assert out["theta_exact_frac"] == [None, 1.0]
    assert all(out[name][0] is None for name in COLUMNS if not name.startswith("n_rows"))


# ---------------------------------------------------------------- layout, report columns, validation

def test_head_major_layout_equals_per_row_head_index() -> None:
    rows = _synthetic_rows(7, 4 * 50)
    grid = {k: v.reshape(H, 50) for k, v in rows.items() if k != "head"}
    a = HeadAggregate.create(H)
    a.update(None, **grid)
    b = HeadAggregate.create(H)
    b.update(torch.arange(H).repeat_interleave(50), **{k: v.reshape(-1) for k, v in grid.items()})
    assert a.finalize() == b.finalize()


def test_finalize_columns_are_complete_and_finite() -> None:
    out = _aggregate(_synthetic_rows(8, 500)).finalize()
    assert tuple(out) == COLUMNS
    for name, values in out.items():
        assert len(values) == H
        if name == "sink_mass_mean":                     # no sink rows given: not applicable
            assert values == [None] * H
            continue
        assert all(v is not None and math.isfinite(v) for v in values), name
    assert all(isinstance(v, int) for v in out["n_rows"] + out["n_rows_short"])
    for tag in ("p05", "p50"):
        assert all(lo <= mid <= hi for lo, mid, hi in
                   zip(out[f"theta_{tag}_lo"], out[f"theta_{tag}"], out[f"theta_{tag}_hi"]))
    empty = HeadAggregate.create(2).finalize()
    assert empty["n_rows"] == [0, 0] and empty["theta_tilde_lo"] == [None, None]


def test_exact_override_and_width() -> None:
    agg = HeadAggregate.create(1, min_keys=1)
    lo = torch.tensor([0.5, 0.7], dtype=F64)
    common = dict(theta_lo=lo, theta_hi=lo + 2e-6, pmax=lo, entropy=lo, n_keys=torch.tensor([3, 3]),
                  theta_paper=lo)
    agg.update(torch.zeros(2, dtype=torch.int64), **common)
    agg.update(torch.zeros(2, dtype=torch.int64), **common, exact=torch.tensor([True, False]))
    out = agg.finalize()
    assert out["theta_exact_frac"] == [0.25] and out["theta_width_max"][0] == pytest.approx(2e-6)


def test_invalid_updates_are_rejected() -> None:
    agg = HeadAggregate.create(2)
    x = torch.tensor([0.5], dtype=F64)
    kwargs = dict(theta_lo=x, theta_hi=x, pmax=x, entropy=x, n_keys=torch.tensor([20]), theta_paper=x)
    with pytest.raises(ValueError, match="head index"):
        agg.update(torch.tensor([2]), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        agg.update(torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        agg.update(torch.tensor([0]), **{**kwargs, "pmax": torch.tensor([math.nan], dtype=F64)})
    with pytest.raises(ValueError, match="same number of heads"):
        agg.merge(HeadAggregate.create(3))


def test_sink_mass_mean_over_aggregated_rows_and_merges() -> None:
    """``sink_mass_mean`` is the mean of the given sink masses over rows with n_keys >= min_keys, also after a
    merge of two halves; short rows and heads without rows are left out (null)."""
    rows = _synthetic_rows(9, 400)
    rows["sink_mass"] = torch.rand(400, generator=torch.Generator().manual_seed(1), dtype=F64)
    rows["head"] = rows["head"].clamp(max=H - 2)                                      # the last head has no row
    whole = _aggregate(rows).finalize()["sink_mass_mean"]
    halves = _aggregate(rows, slice(0, 150)).merge(_aggregate(rows, slice(150, None))).finalize()["sink_mass_mean"]
    keep = rows["n_keys"] >= DEFAULT_MIN_KEYS
    for h in range(H - 1):
        sel = keep & (rows["head"] == h)
        assert whole[h] == pytest.approx(float(rows["sink_mass"][sel].mean()), rel=1e-12)
        assert halves[h] == pytest.approx(whole[h], rel=1e-12)
    assert whole[H - 1] is None

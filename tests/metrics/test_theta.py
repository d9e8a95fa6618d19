"""Tests of the θ algorithms against THEORY §17: T1–T7, T9, T28, plus masking, float32 slack and KK.

All float64 on CPU, seeded. "Rounding" tolerances (≤ 1e-15) stand for the catalogue's "0 violations": two float
evaluations of the same subset may differ in the last bits.
"""
from __future__ import annotations

import heapq
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnstab_cli.metrics.theta as th
from attnstab_cli.metrics.theta import (
    ThetaRule,
    compute_maximiser_signs,
    compute_pmax_entropy,
    compute_theta_exact,
    compute_theta_interval,
    compute_theta_paper,
    compute_theta_subset,
)

ROUND = 1e-15
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax_rows(g: torch.Generator, rows: int, n: int, scale: float, tau: float = 1.0) -> torch.Tensor:
    """Rows softmax(scale·z/τ), z ~ N(0, 1): [rows, n] float64."""
    return torch.softmax(scale * torch.randn(rows, n, generator=g, dtype=F64) / tau, -1)


def _families(g: torch.Generator, n: int, rows: int = 4) -> torch.Tensor:
    """Random, peaked, uniform, top-k-uniform, Dirichlet, one-hot and sink-like rows of n keys: [7·rows, n]."""
    out = [_softmax_rows(g, rows, n, s) for s in (0.5, 2.0, 5.0)]
    peaked = torch.rand(rows, n, generator=g, dtype=F64)
    peaked[:, 0] = peaked[:, 1:].sum(-1) * (1.0 + torch.rand(rows, generator=g, dtype=F64))
    out.append(peaked / peaked.sum(-1, keepdim=True))
    out.append(torch.full((rows, n), 1.0 / n, dtype=F64))
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    topk = torch.zeros(rows, n, dtype=F64)
    topk[:, :k] = 1.0 / k
    out.append(topk[:, torch.randperm(n, generator=g)])
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
    for alpha in (0.1, 1.0):
        out.append(torch.from_numpy(rng.dirichlet(np.full(n, alpha), size=rows)))
    one_hot = torch.zeros(rows, n, dtype=F64)
    one_hot[torch.arange(rows), torch.randint(0, n, (rows,), generator=g)] = 1.0
    out.append(one_hot)
    sink = _softmax_rows(g, rows, n, 1.0)
    sink[:, 0] += torch.rand(rows, generator=g, dtype=F64) * 0.9
    out.append(sink / sink.sum(-1, keepdim=True))
    return torch.cat(out)


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of different lengths as one batch, right-padded with zeros (which never count, §3.1)."""
    width = max(x.shape[1] for x in parts)
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in parts])


def _brute_theta(p: torch.Tensor) -> torch.Tensor:
    """Independent brute force: every subset as a 0/1 matrix, P and Q by matrix products (numpy)."""
    out = []
    for row in p.numpy():
        n = row.size
        subsets = np.array(list(itertools.product([0.0, 1.0], repeat=n)))  # [2^n, n]
        P, Q = subsets @ row, (1.0 - subsets) @ row
        out.append(np.max(4.0 * P * Q / (P + Q) ** 2))
    return torch.tensor(out, dtype=F64)


def _jacobian_inf1(p: torch.Tensor, tau: float) -> torch.Tensor:
    """max over v ∈ {±1}^n of ‖Jv‖₁ with J = (diag p − ppᵀ)/τ, per row of p [R, n] (Thm 4.2 left side)."""
    n = p.shape[1]
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=F64)  # [2^n, n]
    jac = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / tau      # [R, n, n]
    return (signs @ jac.transpose(1, 2)).abs().sum(-1).amax(-1)            # [R]


def _jv_norm(p: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """‖Jv‖₁ per row for given sign vectors v [R, n]."""
    pv = (p * v).sum(-1, keepdim=True)
    return (p * (v - pv)).abs().sum(-1) / tau


# ---------------------------------------------------------------- T1, T2: Theorem 4.2 and its maximiser

@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_t1_exhaustive_jacobian_norm_equals_theta_over_tau(tau: float) -> None:
    g = _gen(1)
    for n in range(2, 13):
        p = torch.cat([_softmax_rows(g, 2, n, s, tau) for s in (0.1, 0.5, 1.0, 3.0, 10.0)])
        norm = _jacobian_inf1(p, tau)
        theta = compute_theta_exact(p)
        assert (norm - theta / tau).abs().max() <= 1e-12
        iv = compute_theta_interval(p, slack=0.0)
        assert (iv.lo - theta).abs().max() <= ROUND and (iv.hi - theta).abs().max() <= ROUND


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_t2_maximiser_sign_vector_attains_theta(tau: float) -> None:
    g = _gen(2)
    for n in (3, 8, 17):
        p = torch.cat([_families(g, n, 2), _softmax_rows(g, 10, n, 2.0, tau)])
        iv = compute_theta_interval(p, slack=0.0)
        assert bool((iv.hi - iv.lo <= ROUND).all())
        v = compute_maximiser_signs(iv.subset)
        assert (_jv_norm(p, v, tau) - iv.lo / tau).abs().max() <= 1e-14


# ---------------------------------------------------------------- T3: Corollary 4.3 closed forms

@pytest.mark.parametrize("n", [2, 3, 7, 12, 19, 20, 21, 64, 255, 1000, 1001])
def test_t3_uniform_rows(n: int) -> None:
    p = torch.full((1, n), 1.0 / n, dtype=F64)
    want = 1.0 - (n % 2) / n**2
    iv = compute_theta_interval(p, slack=0.0)
    assert abs(float(iv.lo) - want) <= 1e-14 and float(iv.hi) >= want - ROUND
    if n <= 20:
        assert abs(float(compute_theta_exact(p)) - want) <= 1e-14


def test_t3_one_hot_rows_are_zero() -> None:
    p = torch.zeros(5, 30, dtype=F64)
    p[torch.arange(5), torch.tensor([0, 3, 7, 29, 15])] = 1.0
    iv = compute_theta_interval(p, slack=0.0)
    assert bool((iv.lo == 0).all() and (iv.hi == 0).all())
    assert bool((compute_theta_exact(p) == 0).all())
    assert bool((iv.lo_rule == ThetaRule.SINGLE).all())


@pytest.mark.parametrize("n", [2, 5, 20, 500])
def test_t3_peaked_rows_exact_closed_form(n: int) -> None:
    g = _gen(3)
    p = torch.rand(20, n, generator=g, dtype=F64)
    p[:, 0] = p[:, 1:].sum(-1) * (1.0 + 3 * torch.rand(20, generator=g, dtype=F64))
    p = p / p.sum(-1, keepdim=True)
    stats = compute_pmax_entropy(p)
    want = 4.0 * stats.pmax * stats.one_minus_pmax / (stats.pmax + stats.one_minus_pmax) ** 2
    iv = compute_theta_interval(p, slack=0.0)
    assert bool((iv.lo_rule == ThetaRule.PEAKED).all())
    assert (iv.lo - want).abs().max() <= 1e-14 and (iv.hi - want).abs().max() <= 1e-14
    if n <= 12:
        assert (_brute_theta(p) - want).abs().max() <= 1e-14


@pytest.mark.parametrize("k,n", [(1, 30), (2, 30), (3, 5), (7, 40), (14, 100), (15, 300), (33, 64)])
def test_t3_uniform_on_top_k(k: int, n: int) -> None:
    g = _gen(4)
    p = torch.zeros(3, n, dtype=F64)
    for r in range(3):
        p[r, torch.randperm(n, generator=g)[:k]] = 1.0 / k
    want = 1.0 - (k % 2) / k**2
    iv = compute_theta_interval(p, slack=0.0)
    assert (iv.lo - want).abs().max() <= 1e-14 and bool((iv.hi >= want - ROUND).all())
    assert bool((iv.n_keys == k).all())


# ---------------------------------------------------------------- T4: closed-form bounds and heuristics

def test_t4_closed_form_bounds_and_heuristic_guarantees() -> None:
    g = _gen(5)
    p = _pad_cat([_families(g, n, 3) for n in range(3, 17)])
    exact = compute_theta_exact(p)
    pmax, rest, _ = compute_pmax_entropy(p)
    pmax, rest = pmax / (pmax + rest), rest / (pmax + rest)                # exactly normalised
    floor = torch.maximum(4 * pmax * rest, 1 - pmax**2)
    assert bool((exact >= floor - 1e-14).all())
    vals, _, n_keys = th._sort_rows(p)
    prefix = compute_theta_subset(vals, th._prefix_mask(vals))
    j_star = (vals.cumsum(-1) >= 0.5 - 1e-15).to(torch.int64).argmax(-1, keepdim=True)
    assert bool((prefix >= 1 - vals.gather(1, j_star)[:, 0] ** 2 - ROUND).all())
    take, plus = th._greedy_masks(vals)
    greedy = torch.maximum(compute_theta_subset(vals, take), compute_theta_subset(vals, plus))
    min_rejected = torch.where(take | (vals == 0), math.inf, vals).amin(-1)
    rejected_any = torch.isfinite(min_rejected)
    assert bool((greedy[rejected_any] >= 1 - min_rejected[rejected_any] ** 2 - ROUND).all())
    kk = compute_theta_subset(vals, th._kk_masks(vals, n_keys))
    topk = compute_theta_subset(vals, th._topk_refine(vals, 4)[1])
    paper = compute_theta_paper(p)
    for heuristic in (prefix, greedy, kk, topk, paper):
        assert bool((heuristic <= exact + ROUND).all())


# ---------------------------------------------------------------- T5: A1 enumeration

def test_t5_enumeration_matches_brute_force() -> None:
    g = _gen(6)
    p = _pad_cat([_families(g, n, 2) for n in range(2, 13)])
    assert (compute_theta_exact(p) - _brute_theta(p)).abs().max() <= ROUND


def test_t5_near_one_hot_is_not_rounded_to_zero() -> None:
    logits = torch.tensor([[0.0, -40.0, -41.0, -45.0]], dtype=F64)
    p = torch.softmax(logits, -1)
    tail = math.exp(-40) + math.exp(-41) + math.exp(-45)
    want = 4.0 * tail / (1.0 + tail) ** 2
    assert f"{want:.3e}" == "2.336e-17"
    for value in (compute_theta_exact(p), compute_theta_interval(p, slack=0.0).lo,
                  compute_theta_interval(p, slack=0.0).hi, compute_theta_paper(p)):
        assert abs(float(value) - want) <= 1e-12 * want
    assert float(compute_pmax_entropy(p).one_minus_pmax) == pytest.approx(tail / (1 + tail), rel=1e-14)


def test_exact_rejects_more_than_twenty_keys() -> None:
    with pytest.raises(ValueError, match="20"):
        compute_theta_exact(torch.full((1, 21), 1 / 21, dtype=F64))
    padded = torch.zeros(1, 40, dtype=F64)
    padded[0, ::2] = 1 / 20                                                # 20 keys among 40 columns
    assert float(compute_theta_exact(padded)) == pytest.approx(1.0, abs=ROUND)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.tensor([[0.5, -0.1, 0.6]]), torch.tensor([[math.nan, 1.0]])])
def test_bad_rows_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        compute_theta_interval(bad)


# ---------------------------------------------------------------- T6, T7: A2 and A3 without enumeration

@pytest.mark.parametrize("top_k", [0, 14])
def test_t6_a2_subsets_and_containment(top_k: int) -> None:
    g = _gen(7)
    for n in (4, 9, 15, 20):
        p = _families(g, n, 6)
        iv = compute_theta_interval(p, top_k=top_k, exact_max_keys=0, slack=0.0)
        assert torch.equal(compute_theta_subset(p, iv.subset), iv.lo)
        exact = compute_theta_exact(p)
        assert bool((iv.lo <= exact + ROUND).all() and (iv.hi >= exact - ROUND).all())
    long_rows = _softmax_rows(g, 8, 300, 3.0)
    iv = compute_theta_interval(long_rows, top_k=top_k, slack=0.0)
    assert torch.equal(compute_theta_subset(long_rows, iv.subset), iv.lo)


def test_t7_topk_refinement_against_enumeration() -> None:
    g = _gen(8)
    checked = exact_rows = 0
    for n in range(4, 21):
        p = _families(g, n, 3)
        exact = compute_theta_exact(p)
        sorted_p = p.sort(-1, descending=True).values
        for k in (2, 3, 5, 8, 12):
            iv = compute_theta_interval(p, top_k=k, exact_max_keys=0, slack=0.0)
            assert bool((iv.lo <= exact + ROUND).all() and (iv.hi >= exact - ROUND).all())
            certified = iv.hi < 1.0
            assert bool(((iv.hi - iv.lo)[certified] <= ROUND).all())
            delta = sorted_p[:, k] if k < n else torch.zeros(p.shape[0], dtype=F64)
            assert bool((iv.hi - iv.lo <= delta**2 + ROUND).all())
            checked += p.shape[0]
            exact_rows += int((certified & (iv.hi_rule == ThetaRule.TOPK)).sum())
    assert checked > 2000 and exact_rows > 100


# ---------------------------------------------------------------- T9: regularity; T28: the paper's estimator

def test_t9_theta_is_two_lipschitz_in_l1() -> None:
    g = _gen(9)
    for n in (2, 5, 12):
        p = torch.cat([_families(g, n, 4), _softmax_rows(g, 20, n, 1.0)])
        for eps in (1e-9, 1e-4, 1e-1, 1.0):
            q = torch.softmax(torch.log(p + 1e-300) + eps * torch.randn(p.shape, generator=g, dtype=F64), -1)
            dist = (p - q).abs().sum(-1)
            keep = dist >= 1e-12
            diff = (compute_theta_exact(p) - compute_theta_exact(q)).abs()
            # + 1e-15: near one-hot pairs attain the constant, and ‖p − q‖₁ itself is rounded at the 1e-16 level
            assert bool((diff[keep] <= 2 * dist[keep] * (1 + 1e-9) + ROUND).all())


def test_t9_float32_rows_move_theta_by_at_most_1e6() -> None:
    g = _gen(10)
    logits = 3.0 * torch.randn(200, 12, generator=g, dtype=F64)
    theta64 = compute_theta_exact(torch.softmax(logits, -1))
    theta32 = compute_theta_exact(torch.softmax(logits.float(), -1))
    assert (theta64 - theta32).abs().max() <= 1e-6


def test_t28_paper_estimator_is_below_exact_and_often_wrong() -> None:
    g = _gen(28)
    p = torch.cat([_softmax_rows(g, 400, 12, 1.0), _families(g, 12, 10)])
    exact, paper = compute_theta_exact(p), compute_theta_paper(p)
    assert bool((paper <= exact + ROUND).all())
    mismatch = ((exact - paper)[:400] > 1e-12).double().mean()
    assert mismatch > 0.5


# ---------------------------------------------------------------- masking, float32 slack, long rows, KK

def _insert_zeros(p: torch.Tensor, n_zeros: int, g: torch.Generator) -> torch.Tensor:
    """Columns of p with n_zeros zero columns inserted at random positions (same positions for all rows)."""
    n = p.shape[1] + n_zeros
    cols = torch.randperm(n, generator=g)[: p.shape[1]].sort().values
    out = torch.zeros(p.shape[0], n, dtype=p.dtype)
    out[:, cols] = p
    return out


@pytest.mark.parametrize("n", [6, 19, 40, 200])
def test_zero_entries_never_count(n: int) -> None:
    g = _gen(11)
    p = _families(g, n, 3)
    padded = _insert_zeros(p, 2 * n + 3, g)
    a = compute_theta_interval(p, slack=0.0)
    b = compute_theta_interval(padded, slack=0.0)
    assert torch.equal(a.n_keys, b.n_keys) and torch.equal(a.pmax, b.pmax)
    assert (a.lo - b.lo).abs().max() <= ROUND and (a.hi - b.hi).abs().max() <= ROUND
    assert (compute_theta_paper(p) - compute_theta_paper(padded)).abs().max() <= ROUND
    assert not bool((b.subset & (padded == 0)).any())
    sa, sb = compute_pmax_entropy(p), compute_pmax_entropy(padded)
    for x, y in zip(sa, sb):
        assert (x - y).abs().max() <= 1e-14


@pytest.mark.parametrize("n", [5, 12, 20, 64, 300])
def test_float32_rows_contain_float64_truth_after_slack(n: int) -> None:
    g = _gen(12)
    logits = torch.cat([s * torch.randn(12, n, generator=g, dtype=F64) for s in (0.5, 2.0, 6.0)])
    iv32 = compute_theta_interval(torch.softmax(logits.float(), -1))
    assert iv32.slack == th.THETA_SLACK
    iv64 = compute_theta_interval(torch.softmax(logits, -1), slack=0.0)
    truth = iv64.lo[iv64.exact]
    assert truth.numel() > 0
    assert bool((iv32.lo[iv64.exact] <= truth).all() and (iv32.hi[iv64.exact] >= truth).all())
    assert bool((iv32.lo <= iv64.hi).all() and (iv32.hi >= iv64.lo).all())
    assert bool((iv32.lo >= 0).all() and (iv32.hi <= 1).all())


def test_slack_widens_and_clamps() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.3, 0.1]], dtype=F64)
    iv = compute_theta_interval(p, slack=1e-3)
    assert iv.lo.tolist() == [0.0, pytest.approx(1 - 1e-3, abs=1e-15), pytest.approx(0.96 - 1e-3, abs=1e-14)]
    assert iv.hi.tolist() == [pytest.approx(1e-3, abs=1e-15), 1.0, pytest.approx(0.96 + 1e-3, abs=1e-14)]
    assert iv.exact.tolist() == [True, True, True]


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0])
def test_long_rows_are_certified(scale: float) -> None:
    g = _gen(13)
    p = _softmax_rows(g, 6, 700, scale)
    iv = compute_theta_interval(p, slack=0.0)
    assert torch.equal(compute_theta_subset(p, iv.subset), iv.lo)
    assert bool((iv.lo <= iv.hi).all())
    stats = compute_pmax_entropy(p)
    assert bool((iv.lo >= 1 - stats.pmax**2 - ROUND).all())
    if scale <= 2.0:                                                       # KK is practically exact (§3.3)
        assert (iv.hi - iv.lo).max() <= 1e-12


def _kk_reference(row: list[float]) -> float:
    """Textbook Karmarkar–Karp on a max-heap: the final difference."""
    heap = [-v for v in row]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = -heapq.heappop(heap), -heapq.heappop(heap)
        heapq.heappush(heap, -(a - b))
    return -heap[0]


@pytest.mark.parametrize("n", [10, 47, 200, 1500])
def test_kk_matches_textbook_differencing(n: int) -> None:
    g = _gen(14)
    p = torch.cat([_softmax_rows(g, 3, n, s) for s in (0.5, 2.0, 6.0)])
    vals, _, n_keys = th._sort_rows(p)
    mask = th._kk_masks(vals, n_keys)
    disc = ((vals * mask).sum(-1) - (vals * ~mask).sum(-1)).abs()
    ref = torch.tensor([_kk_reference(r) for r in vals.tolist()], dtype=F64)
    assert (disc - ref).abs().max() <= 1e-12


# ---------------------------------------------------------------- property tests

_row = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0), st.floats(1e-300, 1e-6)), min_size=1, max_size=14)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_row, st.integers(0, 6))
def test_property_interval_contains_exact(row: list[float], top_k: int) -> None:
    p = torch.tensor([row], dtype=F64)
    exact = compute_theta_exact(p)
    assert 0.0 <= float(exact) <= 1.0
    for kwargs in ({}, {"exact_max_keys": 0, "top_k": top_k}, {"exact_max_keys": 0, "top_k": top_k, "tol": 1e-3}):
        iv = compute_theta_interval(p, slack=0.0, **kwargs)   # tol > 0 (the scan's) skips A3/KK, stays certified
        assert float(iv.lo) <= float(exact) + ROUND and float(iv.hi) >= float(exact) - ROUND
        assert torch.equal(compute_theta_subset(p, iv.subset), iv.lo)
    assert float(compute_theta_paper(p)) <= float(exact) + ROUND


@settings(max_examples=100, deadline=None, derandomize=True)
@given(_row, st.data())
def test_property_invariances(row: list[float], data: st.DataObject) -> None:
    p = torch.tensor([row], dtype=F64)
    perm = data.draw(st.permutations(range(len(row))))
    scale = data.draw(st.sampled_from([0.5, 3.0, 1024.0]))
    zeros = data.draw(st.integers(0, 5))
    exact = float(compute_theta_exact(p))
    variants = [p[:, perm], scale * p, _insert_zeros(p, zeros, _gen(len(row)))]
    for q in variants:
        assert abs(float(compute_theta_exact(q)) - exact) <= 4 * ROUND


def test_exchange_is_the_best_single_swap() -> None:
    """The exchange candidate of A2 equals the best single swap (or no swap) found by brute force."""
    from attnstab_cli.metrics.theta import _exchange_mask

    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        m = 2 + trial % 10
        v = torch.rand(3, m, generator=g, dtype=torch.float64).sort(-1, descending=True).values
        take = torch.rand(3, m, generator=g) < 0.5
        out = _exchange_mask(v, take)
        for r in range(3):
            half, p = float(v[r].sum()) / 2, float(v[r][take[r]].sum())
            best = min([abs(p - half)] + [abs(p - float(v[r, a]) + float(v[r, b]) - half)
                                         for a in range(m) for b in range(m) if take[r, a] and not take[r, b]])
            assert abs(float(v[r][out[r]].sum()) - half) == pytest.approx(best, abs=1e-13)
            assert int((out[r] != take[r]).sum()) in (0, 2)

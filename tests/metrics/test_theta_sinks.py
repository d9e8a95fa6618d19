"""θ of attention rows with a sink logit (THEORY §18.4, T33) against independent computations.

References here share no code with the tool: ‖diag(p) − ppᵀ‖∞→1 by enumerating the vertices of the cube (n ≤ 10),
the model's key probabilities from a softmax over the n keys and the sink written out by hand, p_max and the entropy of
the n + 1 outcomes from those rows.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnstab_cli.metrics.theta_scan import ThetaOptions, ThetaPass
from attnstab_cli.reference.row_stats import apply_sinks, attn_row_stats_ref, compute_sink_theta
from trace_helpers import make_trace

F64 = torch.float64


def infinity_to_one(p: torch.Tensor) -> float:
    """‖diag(p) − ppᵀ‖∞→1 of one row ``p [n]`` by the 2^n vertices v ∈ {±1}^n (the maximum of the convex
    ‖Jv‖₁ over the cube is at a vertex)."""
    n = p.numel()
    if n == 0:
        return 0.0
    j = torch.diag(p) - torch.outer(p, p)
    v = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=F64)          # [2^n, n]
    return float((v @ j).abs().sum(-1).max())


def theta_plain(q: torch.Tensor) -> float:
    """θ(q) = max_S 4 q(S)(1 − q(S)) of a row summing to 1, over all subsets."""
    n = q.numel()
    bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=F64)
    mass = bits @ q
    return float((4 * mass * (1 - mass)).max())


def sink_rows(logits: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The model's key probabilities ``[B, H, T, T]``: softmax over the allowed keys and the head's sink logit, sink
    dropped."""
    s = logits.masked_fill(~allowed, -math.inf)
    col = sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.cat([s, col], dim=-1).softmax(-1)[..., :-1]


def test_sink_theta_is_the_exact_infinity_to_one_norm() -> None:
    """T33: m(1 − m) + m² θ(p/m) equals ‖diag(p) − ppᵀ‖∞→1 by vertex enumeration (400 rows, n ≤ 10, sinks from
    negligible to dominant, peaked and flat rows)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for r in range(400):
        n = 1 + r % 10
        logits = torch.randn(n, generator=g, dtype=F64) * (0.3 + 4.0 * (r % 7) / 6)
        sink = torch.randn((), generator=g, dtype=F64) * 4.0
        p = torch.cat([logits, sink.view(1)]).softmax(0)[:n]
        m = float(p.sum())
        got = compute_sink_theta(torch.tensor(theta_plain(p / m), dtype=F64), torch.tensor(1.0 - m, dtype=F64))
        worst = max(worst, abs(float(got) - infinity_to_one(p)))
    assert worst <= 1e-14


def _inputs(seed: int, b: int = 2, h: int = 4, hkv: int = 2, t: int = 9, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=F64) * 2.0
    k = torch.randn(b, hkv, t, d, generator=g, dtype=F64)
    sinks = torch.tensor([-6.0, 0.0, 1.5, 4.0], dtype=F64)[:h]     # from a negligible to a dominant sink
    return q, k, sinks


@pytest.mark.parametrize("window", [None, 3])
def test_row_statistics_with_sinks_match_hand_rows(window: int | None) -> None:
    """Every field of the torch reference with sinks against rows built by hand (causal, padding, GQA): θ brackets
    contain the exact ∞→1 norm and are tight where θ(q) is exact; p_max, 1 − p_max, the entropy of the n + 1
    outcomes and the sink mass agree to rounding."""
    q, k, sinks = _inputs(1)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 2] = False
    scale = 8 ** -0.5
    st = attn_row_stats_ref(q, k, scale, causal=True, key_padding_mask=pad, window=window, sinks=sinks)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None]
    allowed = (j <= i) & ((i - j) < window if window else True)
    allowed = allowed[None, None] & pad[:, None, None, :]
    logits = scale * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    p = sink_rows(logits, allowed, sinks)                                                  # [B, H, T, T]
    mass = p.sum(-1)
    sink = 1.0 - mass
    torch.testing.assert_close(st.sink_mass, sink, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(st.pmax, p.amax(-1), rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(st.one_minus_pmax, 1.0 - p.amax(-1), rtol=1e-12, atol=1e-15)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0).sum(-1)
    torch.testing.assert_close(st.entropy, -plogp - sink * sink.log(), rtol=1e-12, atol=1e-14)
    for b, h, row in itertools.product(range(2), range(4), range(9)):
        keys = p[b, h, row][allowed[b, 0, row]]
        exact = infinity_to_one(keys)
        assert st.theta_lo[b, h, row] <= exact + 1e-14 and exact <= st.theta_hi[b, h, row] + 1e-14
        if keys.numel() <= 1 or float(keys.max() / keys.sum()) >= 0.5:
            assert float(st.theta_hi[b, h, row] - st.theta_lo[b, h, row]) <= 1e-14
    plain = attn_row_stats_ref(q, k, scale, causal=True, key_padding_mask=pad, window=window)
    assert plain.sink_mass is None and torch.equal(apply_sinks(plain, sinks).theta_lo, st.theta_lo)


def test_a_row_without_keys_gives_everything_to_the_sink() -> None:
    """A fully masked row: sink mass 1, θ 0; a row with one key: θ = m(1 − m) (a 1 × 1 Jacobian p − p²)."""
    q, k, sinks = _inputs(2, b=1, t=4)
    pad = torch.tensor([[False, True, True, True]])
    st = attn_row_stats_ref(q, k, 0.5, causal=True, key_padding_mask=pad, sinks=sinks)
    assert torch.equal(st.sink_mass[0, :, 0], torch.ones(4, dtype=F64))
    assert torch.equal(st.theta_hi[0, :, 0], torch.zeros(4, dtype=F64))
    sink = st.sink_mass[0, :, 1]
    torch.testing.assert_close(st.theta_lo[0, :, 1], (1 - sink) * sink, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(st.theta_hi[0, :, 1], (1 - sink) * sink, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("kernel_rows", [None, 0])
def test_theta_pass_on_sink_heads(kernel_rows: int | None) -> None:
    """The θ pass on sink rows long enough for the refinement (n up to 24): each row's certified interval holds the
    exact ‖diag(p) − ppᵀ‖∞→1 (enumerated for n ≤ 10; else θ(q) brute-forced on the renormalized row and mapped
    by hand), sink_mass_mean is the mean over aggregated rows and pmax_max that of the model's probabilities;
    the same heads without sinks report sink_mass_mean null. ``rows_per_head = 0`` skips the refinement of long
    rows, so the streamed bounds alone must hold."""
    g = torch.Generator().manual_seed(3)
    t, h = 24, 4
    q = torch.randn(1, h, t, 8, generator=g, dtype=F64) * 1.5
    k = torch.randn(1, 2, t, 8, generator=g, dtype=F64)
    sinks = torch.tensor([-6.0, 0.0, 1.5, 4.0], dtype=F64)
    trace = make_trace(q, k, 8 ** -0.5, causal=True)
    trace.attn.sinks = sinks
    opts = ThetaOptions(min_keys=4, slack=0.0, rows_per_head=kernel_rows, paper_rows=None)
    tp = ThetaPass(h, 2, opts)
    v = tp.measure(trace.attn)
    logits = 8 ** -0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    p = sink_rows(logits, allowed, sinks)[0]                                               # [H, T, T]
    for head, row in itertools.product(range(h), range(t)):
        keys = p[head, row, : row + 1]
        m = float(keys.sum())
        exact = infinity_to_one(keys) if row < 10 else m * (1 - m) + m * m * _theta_large(keys / m)
        assert float(v.lo[0, head, row]) <= exact + 1e-12 and exact <= float(v.hi[0, head, row]) + 1e-12
        assert float(v.paper[0, head, row]) <= exact + 1e-12 or row + 1 < opts.min_keys
    tp.observe(trace)
    rec = {r["head"]: r for r in tp.records()}
    keep = torch.arange(t) + 1 >= opts.min_keys
    for head in range(h):
        want = float((1.0 - p[head].sum(-1))[keep].mean())
        assert rec[head]["sink_mass_mean"] == pytest.approx(want, rel=1e-12)
        assert rec[head]["pmax_max"] == pytest.approx(float(p[head].amax(-1)[keep].max()), rel=1e-12)
    assert rec[0]["sink_mass_mean"] < 1e-3 < 0.5 < rec[3]["sink_mass_mean"]
    trace.attn.sinks = None
    plain = ThetaPass(h, 2, opts)
    plain.observe(trace)
    assert all(r["sink_mass_mean"] is None for r in plain.records())


def _theta_large(q: torch.Tensor) -> float:
    """θ of a row of up to 24 keys summing to 1, by meet in the middle over the two halves' subset sums."""
    a, b = q[: q.numel() // 2], q[q.numel() // 2:]
    sums = lambda x: torch.tensor(list(itertools.product((0.0, 1.0), repeat=x.numel())), dtype=F64) @ x
    sa, sb = sums(a), torch.sort(sums(b)).values
    target = 0.5 - sa                                                                       # best partner near ½ − sa
    idx = torch.searchsorted(sb, target).clamp(1, sb.numel() - 1)
    cand = torch.stack([sb[idx - 1], sb[idx]], -1) + sa[:, None]
    gap = (cand - 0.5).abs().min()
    return float(1.0 - 4.0 * gap * gap)


def test_kappa_softmax_reads_the_sink_rows() -> None:
    """The fragility pass's sampled softmax terms λ_max(diag p − ppᵀ)·‖s‖/‖p‖ use the model's key probabilities
    (summing to m < 1): the sampled values are a subset of the terms of every row computed by hand with eigvalsh."""
    from attnstab_cli.metrics.fragility import FragilityPass

    q, k, sinks = _inputs(4, b=1, t=6)
    trace = make_trace(q, k, 0.5, causal=True)
    trace.attn.sinks = sinks
    got = FragilityPass(8)._softmax_terms(trace)
    logits = 0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    p = sink_rows(logits, allowed, sinks)[0]                                               # [H, T, T]
    want = []
    for head, row in itertools.product(range(4), range(6)):
        r, s = p[head, row, : row + 1], logits[0, head, row, : row + 1]
        lam = float(torch.linalg.eigvalsh(torch.diag(r) - torch.outer(r, r)).max())
        want.append(lam * float(s.norm()) / float(r.norm()))
    assert len(got) == 24
    assert sorted(got) == pytest.approx(sorted(want), rel=1e-10)

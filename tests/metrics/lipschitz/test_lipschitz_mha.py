"""THEORY T15, T16, T18, T22, T33 (attention sinks, §18.4), T34 (soft-capped logits, §18.5) and hand-computed cases for the MHA bounds of §5.

T16 compares every bound (paper form, l2 and block aggregation, activation form, tier 1) with the alternating-
maximisation lower bound of the exact Jacobian (``torch.autograd.functional.jacobian``) on random heads with biases,
full/partial rotations, GQA/MQA, scales 0.5/1/2 and masks.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnstab_cli.metrics.lipschitz.mha import (compute_attention_allowed, compute_attention_probabilities,
                                                compute_head_norms, compute_head_terms, compute_lambda_h,
                                                compute_mha_bound, compute_mha_refined)
from lip_helpers import (dense_alternating_max, heads_mha, heads_probabilities, heads_qkv, jacobian_blocks,
                         jacobian_inf_to_one, make_random_heads, random_unit_ball_rows, theta_exact)

F64 = torch.float64

# (d, D, H, H_kv, biases, rotary_dim, s * sqrt(D), mask)
CASES = [
    (8, 4, 2, 2, True, 0, 1.0, "causal"),
    (8, 4, 2, 1, True, 4, 1.0, "none"),          # MQA, full rotation
    (12, 4, 4, 2, True, 2, 0.5, "window"),       # GQA, partial rotation
    (12, 4, 4, 4, True, 4, 2.0, "padding"),
    (8, 4, 2, 2, False, 0, 2.0, "none"),
    (10, 6, 2, 1, True, 2, 1.0, "causal"),       # partial rotation, MQA
    (12, 4, 4, 1, False, 4, 0.5, "padding"),
    (8, 4, 4, 2, True, 4, 2.0, "window"),
]


def _norms(m):
    return compute_head_norms(m.wq, m.wk, m.wv, m.wo, m.bq, m.bk, m.bv, m.n_heads, m.n_kv_heads, m.rotary_dim,
                              m.logit_cap, sinks=m.sinks is not None)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_mha_bounds_dominate_lower_bound(case: int) -> None:
    """T16: every valid form >= LB (ratio >= 1 - 1e-9), and refined <= l2 <= paper <= tier 1."""
    d, dh, h, hkv, biases, rot, sf, mask = CASES[case]
    t = 7
    m = make_random_heads(d, dh, h, hkv, t, biases=biases, rotary_dim=rot, scale_factor=sf, mask=mask, seed=case)
    g = torch.Generator().manual_seed(100 + case)
    for scale_x in (0.5, 2.0):
        x = scale_x * torch.randn(t, d, generator=g, dtype=F64)
        blocks = jacobian_blocks(lambda u: heads_mha(u, m), x)
        lower, _ = dense_alternating_max(blocks, list(range(t)), restarts=3, seed=case)
        norms, r2 = _norms(m), float(torch.linalg.vector_norm(x, dim=-1).max())
        theta_rows = theta_exact(heads_probabilities(x, m))                          # [H, T]
        cal = compute_mha_bound(norms, theta_rows.amax(-1), r2, m.scale)
        tier1 = compute_mha_bound(norms, 1.0, r2, m.scale).lip_mha
        q, k, v = heads_qkv(x, m)
        refined = compute_mha_refined(norms, q, k, v, m.scale, m.allowed, theta_rows)
        for value in (cal.lip_mha, cal.lip_mha_l2, cal.lip_mha_block, refined.lip_mha_refined, tier1):
            assert value / lower >= 1 - 1e-9
        assert refined.lip_mha_refined <= cal.lip_mha_l2 * (1 + 1e-12)
        assert cal.lip_mha_l2 <= cal.lip_mha * (1 + 1e-12) and cal.lip_mha_block <= cal.lip_mha * (1 + 1e-12)
        assert cal.lip_mha <= tier1 * (1 + 1e-12)
        assert cal.mha_value_path + cal.mha_attn_path == pytest.approx(cal.lip_mha, rel=1e-13)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_capped_mha_bounds_dominate_lower_bound(case: int) -> None:
    """T34: with logits c tanh(s q.k / c) and raw logits well beyond c, every form (tier 1, tier 2 with θ of the capped
    rows, tier 2r with the uncentred key spread and the per-row factor max_j sech^2) >= LB of the exact Jacobian;
    biased keys enter whole (§18.5)."""
    d, dh, h, hkv, biases, rot, sf, mask = CASES[case]
    t = 7
    m = make_random_heads(d, dh, h, hkv, t, biases=biases, rotary_dim=rot, scale_factor=2.0 * sf, mask=mask,
                          seed=50 + case)
    g = torch.Generator().manual_seed(200 + case)
    for scale_x in (1.0, 3.0):
        x = scale_x * torch.randn(t, d, generator=g, dtype=F64)
        q, k, v = heads_qkv(x, m)
        raw = m.scale * q @ k.repeat_interleave(h // hkv, 0).transpose(-1, -2)
        m.logit_cap = 0.3 * float(raw.abs().max())                                  # raw logits beyond the cap
        assert bool(((raw.abs() > m.logit_cap) & m.allowed).any())
        blocks = jacobian_blocks(lambda u: heads_mha(u, m), x)
        lower, _ = dense_alternating_max(blocks, list(range(t)), restarts=3, seed=case)
        norms, r2 = _norms(m), float(torch.linalg.vector_norm(x, dim=-1).max())
        if biases:
            torch.testing.assert_close(norms.bk_rot, torch.linalg.vector_norm(m.bk.reshape(hkv, dh), dim=-1))
            assert float(norms.bk_pass.abs().max()) == 0.0
        theta_rows = theta_exact(heads_probabilities(x, m))                          # [H, T], capped rows
        cal = compute_mha_bound(norms, theta_rows.amax(-1), r2, m.scale)
        tier1 = compute_mha_bound(norms, 1.0, r2, m.scale).lip_mha
        refined = compute_mha_refined(norms, q, k, v, m.scale, m.allowed, theta_rows)
        for value in (cal.lip_mha, cal.lip_mha_l2, cal.lip_mha_block, refined.lip_mha_refined, tier1):
            assert value / lower >= 1 - 1e-9
        assert refined.lip_mha_refined <= cal.lip_mha_l2 * (1 + 1e-12)
        kn = torch.linalg.vector_norm(k, dim=-1).repeat_interleave(h // hkv, 0)        # [H, T]
        expected = kn[:, None, :].masked_fill(~m.allowed, 0.0).amax(-1)               # max_j ||k_j|| per row
        torch.testing.assert_close(refined.key_spread, expected, rtol=1e-12, atol=1e-12)
        raw_sech2 = (1.0 - torch.tanh(raw / m.logit_cap).pow(2)).masked_fill(~m.allowed, 0.0).amax(-1)  # [H, T]
        assert float(raw_sech2.min()) < 0.9                                            # the factor bites somewhere
        wq, wk = norms.wq[:, None], norms.per_query(norms.wk)[:, None]
        attn = refined.head_row_terms - norms.per_query(norms.wv)[:, None]            # s θ m_i (...) V_i per row
        plain = m.scale * theta_rows * (wq * expected + wk * torch.linalg.vector_norm(q, dim=-1)) * refined.value_spread
        torch.testing.assert_close(attn, raw_sech2 * plain, rtol=1e-10, atol=1e-14)
        m.logit_cap = None


def test_mha_global_pairs_in_ball() -> None:
    """T18: pairs inside the R2-ball, theta = 1: ``||MHA(X) - MHA(Y)||_{inf,2} / ||X - Y||_{inf,2} <= bound``."""
    for case, (d, dh, h, hkv, biases, rot, sf, mask) in enumerate(CASES[:4]):
        m = make_random_heads(d, dh, h, hkv, 6, biases=biases, rotary_dim=rot, scale_factor=sf, mask=mask, seed=case)
        r2 = 2.0
        bound = compute_mha_bound(_norms(m), 1.0, r2, m.scale).lip_mha
        g = torch.Generator().manual_seed(case)
        for _ in range(40):
            x, y = random_unit_ball_rows(6, d, r2, g), random_unit_ball_rows(6, d, r2, g)
            num = torch.linalg.vector_norm(heads_mha(x, m) - heads_mha(y, m), dim=-1).max()
            den = torch.linalg.vector_norm(x - y, dim=-1).max()
            assert float(num / den) <= bound


def _jac(m, x):
    return torch.autograd.functional.jacobian(lambda u: heads_mha(u, m), x)


def test_bias_cancellations() -> None:
    """T15: J unchanged without b^V, b^O; without b^K when unrotated; without the pass-through part of b^K under
    partial rotation; changed when the rotary part of b^K is zeroed."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 8, generator=g, dtype=F64)
    plain = make_random_heads(8, 4, 2, 1, 6, biases=True, rotary_dim=0, scale_factor=1.0, mask="causal", seed=1)
    base = _jac(plain, x)
    for changed in (replace(plain, bv=None, bo=None), replace(plain, bk=None)):
        assert float((_jac(changed, x) - base).abs().max()) <= 1e-12
    part = replace(plain, rotary_dim=2, angles=3.0 * torch.rand(6, 1, generator=g, dtype=F64))
    base = _jac(part, x)
    bk = part.bk.reshape(1, 4)
    no_pass, no_rot = bk.clone(), bk.clone()
    no_pass[:, 2:] = 0
    no_rot[:, :2] = 0
    assert float((_jac(replace(part, bk=no_pass.flatten()), x) - base).abs().max()) <= 1e-12
    assert float((_jac(replace(part, bk=no_rot.flatten()), x) - base).abs().max()) > 1e-6


def test_general_form_equals_paper_form() -> None:
    """T22: without biases ``s theta Lambda ||W^V|| R2 = (theta / tau_eff) Phi_paper``, ``tau_eff = 1/(s sqrt(d_k))``,
    ``Phi_paper = 2 R2^2 ||W^Q|| ||W^K|| ||W^V|| / sqrt(d_k)``; the reported phi_h is Lambda ||W^V|| R2 / sqrt(d_k)."""
    for sf in (0.5, 1.0, 2.0):
        m = make_random_heads(12, 4, 4, 2, 5, biases=False, rotary_dim=4, scale_factor=sf, mask="none", seed=3)
        norms, r2, dk = _norms(m), 1.7, 4
        theta = torch.tensor([0.3, 1.0, 0.7, 0.01], dtype=F64)
        bound = compute_mha_bound(norms, theta, r2, m.scale)
        tau = 1.0 / (m.scale * math.sqrt(dk))
        wk, wv = norms.per_query(norms.wk), norms.per_query(norms.wv)
        phi_paper = 2 * r2 ** 2 * norms.wq * wk * wv / math.sqrt(dk)
        paper = norms.wo * (wv + theta / tau * phi_paper).sum()
        assert bound.lip_mha == pytest.approx(float(paper), rel=1e-12)
        torch.testing.assert_close(bound.phi_h, phi_paper, rtol=1e-12, atol=0)


def test_hand_computed_one_head() -> None:
    """d = d_k = 2, H = 1, no RoPE, R2 = 2, s = 1/sqrt(2), theta = 1/2:
    W^Q = diag(1, 2) (norm 2), W^K = I (1), W^V = diag(3, 1) (3), W^O = diag(0.5, 0.25) (0.5), b^Q = (3, 4) (5).
    Lambda = 2 (1*2 + 0) + 1 (2*2 + 5) = 13;  c = 3 (1 + (1/sqrt2)(1/2)(13)(2)) = 3 + 39/sqrt2;
    L = 0.5 c = 1.5 + 19.5/sqrt2;  value path 1.5, attention path 19.5/sqrt2;  Phi = 13*3*2/sqrt2 = 39 sqrt2.
    Without RoPE b^K enters neither beta^K nor the Jacobian (§5.4)."""
    eye = torch.eye(2, dtype=F64)
    norms = compute_head_norms(torch.diag(torch.tensor([1.0, 2.0], dtype=F64)), eye,
                               torch.diag(torch.tensor([3.0, 1.0], dtype=F64)),
                               torch.diag(torch.tensor([0.5, 0.25], dtype=F64)), torch.tensor([3.0, 4.0], dtype=F64),
                               torch.tensor([7.0, 7.0], dtype=F64), None, 1, 1, rotary_dim=0)
    s = 1 / math.sqrt(2)
    assert float(compute_lambda_h(norms, 2.0)[0]) == pytest.approx(13.0, rel=1e-15)
    bound = compute_mha_bound(norms, 0.5, 2.0, s)
    assert float(bound.head_term_calibrated[0]) == pytest.approx(3 + 39 / math.sqrt(2), rel=1e-14)
    assert bound.lip_mha == pytest.approx(1.5 + 19.5 / math.sqrt(2), rel=1e-14)
    assert bound.mha_value_path == pytest.approx(1.5, rel=1e-15)
    assert bound.mha_attn_path == pytest.approx(19.5 / math.sqrt(2), rel=1e-14)
    assert float(bound.phi_h[0]) == pytest.approx(39 * math.sqrt(2), rel=1e-14)
    # Full rotation: all of b^K = (7, 7) is rotary, beta^K = 7 sqrt2, Lambda = 2 (2 + 7 sqrt2) + 9.
    rotated = compute_head_norms(torch.diag(torch.tensor([1.0, 2.0], dtype=F64)), eye, eye, eye,
                                 torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([7.0, 7.0], dtype=F64), None, 1, 1,
                                 rotary_dim=2)
    assert float(compute_lambda_h(rotated, 2.0)[0]) == pytest.approx(13 + 14 * math.sqrt(2), rel=1e-14)
    assert float(compute_head_terms(rotated, 0.0, 2.0, s)[0]) == pytest.approx(1.0)     # theta = 0: value path only


def test_gqa_sharing_counts_shared_heads() -> None:
    """§5.5: the sum runs over query heads; a shared K/V head enters H / H_kv times (value path = ||W^O|| sum_h ||W^V_g||)."""
    m = make_random_heads(12, 4, 4, 1, 5, biases=True, rotary_dim=0, scale_factor=1.0, mask="none", seed=5)
    norms = _norms(m)
    bound = compute_mha_bound(norms, 0.0, 1.0, m.scale)
    assert bound.mha_value_path == pytest.approx(4 * norms.wo * float(norms.wv[0]), rel=1e-14)
    assert bound.mha_attn_path == 0.0


def test_refined_hand_case_two_keys() -> None:
    """Activation form on one head, two keys, q = (1, 0), k_1 = (0, 0), k_2 = (2, 0), v_1 = (0, 0), v_2 = (0, 4),
    s = 1, weights with unit norms, no biases. Row 1 sees both keys: logits (0, 2), p = (1/(1+e^2), e^2/(1+e^2)).
    K = min(max_j ||k_j - kbar||, max_j ||k_j||) = min(2 max(p_1, p_2), 2) = 2 p_2; V = min(4 p_2, 4) = 4 p_2;
    theta = 4 p_1 p_2; c = 1 + theta (K + ||q||) V."""
    eye = torch.eye(2, dtype=F64)
    norms = compute_head_norms(eye, eye, eye, eye, None, None, None, 1, 1)
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=F64)
    k = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]], dtype=F64)
    v = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]], dtype=F64)
    allowed = compute_attention_allowed(2, causal=True, window=None)
    p = compute_attention_probabilities(q, k, 1.0, allowed)
    theta = theta_exact(p)
    out = compute_mha_refined(norms, q, k, v, 1.0, allowed, theta)
    p2 = math.exp(2) / (1 + math.exp(2))
    th = 4 * p2 * (1 - p2)
    assert float(theta[0, 1]) == pytest.approx(th, rel=1e-14)
    assert float(out.key_spread[0, 1]) == pytest.approx(2 * p2, rel=1e-14)
    assert float(out.value_spread[0, 1]) == pytest.approx(4 * p2, rel=1e-14)
    assert float(out.row_terms[1]) == pytest.approx(1 + th * (2 * p2 + 1) * 4 * p2, rel=1e-13)
    assert float(out.row_terms[0]) == pytest.approx(1.0)            # row 0 has one key: theta = 0
    assert out.lip_mha_refined == pytest.approx(float(out.row_terms.max()))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sink_mha_bounds_dominate_lower_bound(case: int) -> None:
    """T33: heads whose rows share their mass with a sink logit (rows sum to m < 1, from a negligible to a dominant
    sink), with biases: tier 1, tier 2 (θ_sink, the exact ∞→1 norm of each row's Jacobian) and tier 2r >= LB of the
    exact Jacobian; the key bias enters whole, the value magnitude is ||W^V|| R2 + ||b^V|| (centre 0) and tier
    2r's spreads are max_j ||k_j||, max_j ||v_j|| (§18.4 (i)-(iii))."""
    d, dh, h, hkv, biases, rot, sf, mask = CASES[case]
    t = 7
    m = make_random_heads(d, dh, h, hkv, t, biases=True, rotary_dim=rot, scale_factor=sf, mask=mask,
                          seed=80 + case)
    g = torch.Generator().manual_seed(300 + case)
    for scale_x in (0.5, 2.0):
        x = scale_x * torch.randn(t, d, generator=g, dtype=F64)
        m.sinks = None                                          # sinks around each head's median row log-sum-exp
        q, k, _ = heads_qkv(x, m)
        raw = (m.scale * q @ k.repeat_interleave(h // hkv, 0).transpose(-1, -2)).masked_fill(~m.allowed, -math.inf)
        m.sinks = raw.logsumexp(-1).median(-1).values + torch.linspace(-3.0, 3.0, h, dtype=F64)
        p = heads_probabilities(x, m)                                                 # [H, T, T]
        assert float((1.0 - p.sum(-1)).max()) > 0.05                                 # the sinks matter
        blocks = jacobian_blocks(lambda u: heads_mha(u, m), x)
        lower, _ = dense_alternating_max(blocks, list(range(t)), restarts=3, seed=case)
        norms, r2 = _norms(m), float(torch.linalg.vector_norm(x, dim=-1).max())
        assert norms.sinks and float(norms.bk_pass.abs().max()) == 0.0
        torch.testing.assert_close(norms.bk_rot, torch.linalg.vector_norm(m.bk.reshape(hkv, dh), dim=-1))
        theta_rows = jacobian_inf_to_one(p)                                           # [H, T]
        cal = compute_mha_bound(norms, theta_rows.amax(-1), r2, m.scale)
        tier1 = compute_mha_bound(norms, 1.0, r2, m.scale).lip_mha
        q, k, v = heads_qkv(x, m)
        refined = compute_mha_refined(norms, q, k, v, m.scale, m.allowed, theta_rows)
        for value in (cal.lip_mha, cal.lip_mha_l2, cal.lip_mha_block, refined.lip_mha_refined, tier1):
            assert value / lower >= 1 - 1e-9
        assert refined.lip_mha_refined <= cal.lip_mha_l2 * (1 + 1e-12) and cal.lip_mha <= tier1 * (1 + 1e-12)
        # §18.4 by hand: M_K = ||W^K|| R2 + ||b^K||, M_V = ||W^V|| R2 + ||b^V||
        spec = lambda w, n: torch.linalg.matrix_norm(w.reshape(d, n, dh).transpose(0, 1), ord=2)   # [n]
        wq, wk, wv = spec(m.wq, h), spec(m.wk, hkv), spec(m.wv, hkv)
        bq = torch.linalg.vector_norm(m.bq.reshape(h, dh), dim=-1)
        bk, bv = (torch.linalg.vector_norm(b.reshape(hkv, dh), dim=-1) for b in (m.bk, m.bv))
        rep = lambda x_: x_.repeat_interleave(h // hkv)
        lam = wq * (rep(wk) * r2 + rep(bk)) + rep(wk) * (wq * r2 + bq)
        c = rep(wv) + m.scale * theta_rows.amax(-1) * lam * (rep(wv) * r2 + rep(bv))
        assert cal.lip_mha == pytest.approx(float(torch.linalg.matrix_norm(m.wo, ord=2) * c.sum()), rel=1e-10)
        kn = torch.linalg.vector_norm(k, dim=-1).repeat_interleave(h // hkv, 0)         # [H, T]
        vn = torch.linalg.vector_norm(v, dim=-1).repeat_interleave(h // hkv, 0)
        torch.testing.assert_close(refined.key_spread, kn[:, None, :].masked_fill(~m.allowed, 0.0).amax(-1))
        torch.testing.assert_close(refined.value_spread, vn[:, None, :].masked_fill(~m.allowed, 0.0).amax(-1))


def test_sink_rows_need_the_uncentred_value_magnitude() -> None:
    """The centring of §5.3 fails with sinks: on a head with a large value bias and a strong sink, the sink-blind
    bound (θ of the renormalized rows, centred keys and values) falls below the LB of the exact Jacobian; the
    §18.4 bound does not."""
    m = make_random_heads(6, 3, 1, 1, 5, biases=True, rotary_dim=0, scale_factor=2.0, mask="causal", seed=7)
    m.bv = 40.0 * m.bv
    m.sinks = torch.tensor([1.0], dtype=F64)
    x = 1.5 * torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    blocks = jacobian_blocks(lambda u: heads_mha(u, m), x)
    lower, _ = dense_alternating_max(blocks, list(range(5)), restarts=3, seed=0)
    r2 = float(torch.linalg.vector_norm(x, dim=-1).max())
    p = heads_probabilities(x, m)
    sink_bound = compute_mha_bound(_norms(m), jacobian_inf_to_one(p).amax(-1), r2, m.scale).lip_mha
    blind_theta = theta_exact(p / p.sum(-1, keepdim=True)).amax(-1)
    blind = compute_mha_bound(replace(_norms(m), sinks=False), blind_theta, r2, m.scale).lip_mha
    assert blind < lower <= sink_bound * (1 + 1e-9)

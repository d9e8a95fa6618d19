"""THEORY T25 (tier 3, §8.3) and tightness (§8.4).

The matrix-free alternating maximisation (``torch.func`` vjp/jvp through ``run_layer``) is checked against: the dense
alternating maximisation of the exact Jacobian of an independent reference layer (same start vectors), the upper
bound ``max_i sum_j ||T_ij||`` and the tier-2r / 2 / 1 bounds, central finite differences of the reference along its
certificate, and closed forms where the block-(inf,2) norm is known exactly (``X -> M X A``, Lemma 3.2).
"""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.metrics.lipschitz.empirical import (Certificate, TightnessError, compute_empirical_lipschitz,
                                                      compute_layer_empirical, compute_mean_tightness,
                                                      compute_tightness, evaluate_certificate, make_layer_function,
                                                      select_candidate_rows)
from attnstab_cli.metrics.lipschitz.layer import compute_layer_lipschitz, compute_r2_in_reset
from attnstab_cli.model.blocks import run_layer
from lip_helpers import (FAMILY_SHAPES, block_sum_bound, dense_alternating_max, heads_probabilities, jacobian_blocks,
                         make_random_layer, row_theta)

F64 = torch.float64
T = 7


def _layer_and_input(family: str, eps: float, seed: int):
    layer = make_random_layer(family, T, eps, seed)
    g = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(T, layer.cfg.d_model, generator=g, dtype=F64) + 0.3
    return layer, h


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_layer_function_is_the_reference_layer(family: str) -> None:
    """The function tier 3 differentiates is the layer (run_layer, math SDPA) = the independent reference."""
    layer, h = _layer_and_input(family, 1e-5, 0)
    f = make_layer_function(layer.weights, layer.cfg, layer.layer, layer.rope_cs, layer.key_padding_mask)
    torch.testing.assert_close(f(h), layer.reference(h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
@pytest.mark.parametrize("eps", [1e-5, 1.0])
def test_tier3_is_certified_and_below_every_bound(family: str, eps: float) -> None:
    """T25: iterates non-decreasing; result = best iterate = certificate value; the certificate is feasible,
    re-evaluates by jvp and by central finite differences of the reference; ``<= max_i sum_j ||T_ij||``; agrees with
    the dense alternating maximisation (same rows, restarts and seed); ``<= B(2r) <= B(2) <= B(1)`` (tightness <= 1).
    """
    layer, h = _layer_and_input(family, eps, seed=len(family))
    kpm = None if layer.key_padding_mask is None else layer.key_padding_mask[None]
    trace = run_layer(h[None], layer.weights, layer.cfg, layer.layer, 0, layer.rope_cs, kpm)
    mha_in = layer.intermediates(h)["mha_in"]
    theta = row_theta(heads_probabilities(mha_in, layer.heads), layer.heads.sinks)
    radius = 2 * float(torch.linalg.vector_norm(h, dim=-1).max())          # post-LN and output norms: h's radius
    r2_reset = (radius if layer.residual == "post" else
                compute_r2_in_reset(layer.cfg, layer.weights, stream_radius=radius))
    res = compute_layer_lipschitz(layer.weights, layer.cfg, r2_reset, trace, theta)
    scores = res.calibrated_tier.refined.row_terms
    emp = compute_layer_empirical(layer.weights, layer.cfg, layer.layer, h, layer.rope_cs, layer.key_padding_mask,
                                  scores=scores, seed=3)
    value, cert = emp.lip_layer_empirical, emp.certificate
    assert emp.rows[0] == T - 1 and set(emp.rows[1:4]) <= set(torch.argsort(scores, descending=True)[:4].tolist())
    assert len(emp.iterates) == 3 * len(emp.rows)
    for its in emp.iterates:
        assert all(b - a >= -1e-12 * b for a, b in zip(its, its[1:]))
    assert value == max(max(its) for its in emp.iterates) == cert.value
    assert cert.row in emp.rows
    assert float(torch.linalg.vector_norm(cert.delta, dim=-1).max()) <= 1 + 1e-12
    f = make_layer_function(layer.weights, layer.cfg, layer.layer, layer.rope_cs, layer.key_padding_mask)
    assert evaluate_certificate(f, h, cert) == pytest.approx(value, rel=1e-12)
    step = 1e-5
    diff = (layer.reference(h + step * cert.delta) - layer.reference(h - step * cert.delta)) / (2 * step)
    assert float(torch.linalg.vector_norm(diff[cert.row])) == pytest.approx(value, rel=1e-6)
    blocks = jacobian_blocks(layer.reference, h)
    assert value <= block_sum_bound(blocks) * (1 + 1e-12)
    dense, _ = dense_alternating_max(blocks, emp.rows, restarts=3, seed=3)
    assert value == pytest.approx(dense, rel=1e-4)
    rec = res.record
    tight_r = compute_tightness(value, rec.lip_layer_refined, what="tightness_refined")
    tight = compute_tightness(value, rec.lip_layer_calibrated)
    assert 0 < tight <= tight_r <= 1
    assert value <= rec.lip_layer_weights
    assert value <= rec.lip_layer_refined


def test_closed_form_token_mixing() -> None:
    """``f(X) = M X A`` has blocks ``T_ij = M_ij A^T`` and ``||J||_{inf,2} = max_i sum_j |M_ij| ||A||_2`` (Lemma 3.2,
    tight). With A = 2I one iteration is exact; with a general A the iteration is a power iteration on A."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    row_sums = m.abs().sum(-1)                                                           # [T]
    two = compute_empirical_lipschitz(lambda u: m @ u @ (2 * torch.eye(4, dtype=F64)), x, list(range(5)), restarts=2)
    assert two.lip_layer_empirical == pytest.approx(2 * float(row_sums.max()), rel=1e-13)
    assert two.certificate.row == int(row_sums.argmax())
    some = compute_empirical_lipschitz(lambda u: 2 * m @ u, x, [0, 3], restarts=1)
    assert some.lip_layer_empirical == pytest.approx(2 * float(row_sums[[0, 3]].max()), rel=1e-13)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    a = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64)) @ q.T
    gen = compute_empirical_lipschitz(lambda u: m @ u @ a, x, list(range(5)))
    exact = 3.0 * float(row_sums.max())
    assert exact * (1 - 1e-6) <= gen.lip_layer_empirical <= exact * (1 + 1e-12)


def test_chunked_vmap_and_restarts() -> None:
    """``chunk_size`` does not change the result; more restarts never lower it (same seed, lanes are a superset)."""
    layer, h = _layer_and_input("llama", 1e-2, 1)
    f = make_layer_function(layer.weights, layer.cfg, layer.layer, layer.rope_cs)
    full = compute_empirical_lipschitz(f, h, [6, 2, 4], restarts=2)
    chunked = compute_empirical_lipschitz(f, h, [6, 2, 4], restarts=2, chunk_size=2)
    assert chunked.lip_layer_empirical == pytest.approx(full.lip_layer_empirical, rel=1e-12)
    one = compute_empirical_lipschitz(f, h, [6], restarts=1, max_iter=1)
    assert len(one.iterates) == 1 and len(one.iterates[0]) == 1
    assert one.lip_layer_empirical <= full.lip_layer_empirical * (1 + 1e-12)


def test_select_candidate_rows() -> None:
    """§8.3 defaults: the last row, the 3 best-scored other rows, 4 further distinct rows drawn with the seed."""
    scores = torch.tensor([5.0, 0.0, 9.0, 1.0, 7.0, 2.0, 3.0, 8.0, 0.5, 10.0], dtype=F64)
    rows = select_candidate_rows(10, scores, seed=1)
    assert rows[0] == 9 and rows[1:4] == [2, 7, 4]
    assert len(rows) == 8 == len(set(rows))
    assert rows == select_candidate_rows(10, scores, seed=1)
    assert {tuple(select_candidate_rows(10, scores, seed=s)[4:]) for s in range(6)} != {tuple(rows[4:])}
    assert sorted(select_candidate_rows(3, scores[:3])) == [0, 1, 2]
    plain = select_candidate_rows(10, None, seed=0)
    assert plain[0] == 9 and len(plain) == 5 == len(set(plain))


def test_certificate_must_be_feasible() -> None:
    """A perturbation with a row of norm > 1 is no certificate."""
    x = torch.zeros(3, 2, dtype=F64)
    delta = torch.zeros(3, 2, dtype=F64)
    delta[1, 0] = 1.1
    with pytest.raises(ValueError):
        evaluate_certificate(lambda u: u, x, Certificate(1, delta, 1.1))
    delta[1, 0] = 1.0
    assert evaluate_certificate(lambda u: 3 * u, x, Certificate(1, delta, 3.0)) == pytest.approx(3.0)


def test_tightness_checks() -> None:
    """§8.4: ratio lower / bound; above 1 + 1e-6 (float64) or 1 + 1e-3 (float32) is a TightnessError (exit 3);
    NaN is an error too; the mean is over per-sequence ratios."""
    assert compute_tightness(0.5, 2.0) == 0.25
    assert compute_tightness(1 + 5e-7, 1.0) == pytest.approx(1 + 5e-7)
    for lower, dtype in ((1 + 2e-6, F64), (1.002, torch.float32), (math.nan, F64)):
        with pytest.raises(TightnessError) as err:
            compute_tightness(lower, 1.0, dtype)
        assert err.value.exit_code == 3
    assert compute_tightness(1.0005, 1.0, torch.float32) == pytest.approx(1.0005)
    assert compute_mean_tightness([1.0, 2.0], [4.0, 4.0]) == pytest.approx(0.375)
    with pytest.raises(TightnessError):
        compute_mean_tightness([1.0, 5.0], [4.0, 4.0])
    for lowers, bounds in (([1.0], [1.0, 2.0]), ([], [])):
        with pytest.raises(ValueError):
            compute_mean_tightness(lowers, bounds)

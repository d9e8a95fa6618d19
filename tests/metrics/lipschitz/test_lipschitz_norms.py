"""THEORY T13, T14: LayerNorm / RMSNorm Jacobian identities, local/global constants and magnitude reset (§4)."""
from __future__ import annotations

import math

import pytest
import torch

from attnstab_cli.arch.spec import NormKind
from attnstab_cli.metrics.lipschitz.norms import (compute_embedding_radius, compute_norm_lip_global,
                                                  compute_norm_lip_local, compute_norm_lip_tokens,
                                                  compute_norm_statistic, compute_reset_radius, layernorm_jacobian,
                                                  norm_jacobian, rmsnorm_jacobian)
from attnstab_cli.model.blocks import apply_norm
from attnstab_cli.model.weights import NormWeights

F64 = torch.float64
KINDS = (NormKind.LAYERNORM, NormKind.RMSNORM)


def _apply(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, kind: NormKind, eps: float) -> torch.Tensor:
    return apply_norm(x, NormWeights(gamma, beta), kind, eps).out


def _spec(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [1e-5, 1e-2, 1.0, 10.0])
def test_closed_form_jacobian_and_local_bound(kind: NormKind, eps: float) -> None:
    """Closed form = autograd; ``||J|| <= ||gamma||_inf / sqrt(v + eps)``; equality for gamma = 1 (T13, T14)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        d = 3 + trial % 6
        x = torch.randn(d, generator=g, dtype=F64) * 10 ** (trial % 5 - 2)
        gamma = 1 + 0.5 * torch.randn(d, generator=g, dtype=F64)
        beta = torch.randn(d, generator=g, dtype=F64) if kind is NormKind.LAYERNORM else None
        auto = torch.autograd.functional.jacobian(lambda u: _apply(u, gamma, beta, kind, eps), x)
        closed = norm_jacobian(x, gamma, eps, kind)
        torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12 * float(auto.abs().max()))
        bound = float(compute_norm_lip_tokens(gamma, compute_norm_statistic(x, kind), eps))
        assert _spec(closed) <= bound * (1 + 1e-12)
        ones = torch.ones(d, dtype=F64)
        exact = _spec(norm_jacobian(x, ones, eps, kind))
        assert exact == pytest.approx(float(compute_norm_lip_tokens(ones, compute_norm_statistic(x, kind), eps)),
                                      rel=1e-12)


def test_layernorm_identities() -> None:
    """T13: ``J 1 = 0``; ``J x = eps / (sigma^2 + eps) gamma * z``; ``1^T J^T g = 0``."""
    g = torch.Generator().manual_seed(2)
    for eps in (1e-5, 1e-2, 1.0, 10.0):
        x = 3 * torch.randn(7, generator=g, dtype=F64) + 2
        gamma = torch.randn(7, generator=g, dtype=F64)
        jac = layernorm_jacobian(x, gamma, eps)
        var = x.var(unbiased=False)
        z = (x - x.mean()) / torch.sqrt(var + eps)
        assert float((jac @ torch.ones(7, dtype=F64)).abs().max()) <= 1e-12 * float(jac.abs().max())
        torch.testing.assert_close(jac @ x, eps / (var + eps) * gamma * z, rtol=1e-12, atol=1e-12)
        cot = torch.randn(7, generator=g, dtype=F64)
        assert abs(float((jac.T @ cot).sum())) <= 1e-12 * float((jac.T @ cot).abs().max())


def test_rmsnorm_identities_and_global() -> None:
    """T14: ``J x = eps / (ms + eps) gamma * n``; ``J 1 != 0``; global constant attained at ``x = 0``; pairs."""
    g = torch.Generator().manual_seed(3)
    for eps in (1e-5, 1e-2, 1.0):
        x = torch.randn(6, generator=g, dtype=F64)
        gamma = torch.randn(6, generator=g, dtype=F64)
        jac = rmsnorm_jacobian(x, gamma, eps)
        ms = x.pow(2).mean()
        scale = float(jac.abs().max() * x.abs().max())                           # J x cancels: absolute tolerance
        torch.testing.assert_close(jac @ x, eps / (ms + eps) * gamma * x / torch.sqrt(ms + eps), rtol=1e-12,
                                   atol=1e-13 * scale)
        assert float((jac @ torch.ones(6, dtype=F64)).abs().max()) > 1e-6            # no annihilated direction
        at_zero = _spec(rmsnorm_jacobian(torch.zeros(6, dtype=F64), gamma, eps))
        assert at_zero == pytest.approx(compute_norm_lip_global(gamma, eps), rel=1e-12)
        glob = compute_norm_lip_global(gamma, eps)
        for _ in range(50):
            a, b = torch.randn(2, 6, generator=g, dtype=F64) * 10 ** float(torch.randint(-3, 2, (1,), generator=g))
            num = torch.linalg.vector_norm(_apply(a, gamma, None, NormKind.RMSNORM, eps)
                                           - _apply(b, gamma, None, NormKind.RMSNORM, eps))
            assert float(num / torch.linalg.vector_norm(a - b)) <= glob * (1 + 1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_radius(kind: NormKind) -> None:
    """Lemma 3.3 / §4.2: ``||N(x)||_2 <= R2_reset`` for every x (ratio <= 1), tiny to huge inputs."""
    g = torch.Generator().manual_seed(4)
    d = 9
    gamma = torch.randn(d, generator=g, dtype=F64)
    beta = torch.randn(d, generator=g, dtype=F64) if kind is NormKind.LAYERNORM else None
    radius = compute_reset_radius(NormWeights(gamma, beta), kind)
    x = torch.randn(400, d, generator=g, dtype=F64) * torch.logspace(-4, 6, 400, dtype=F64)[:, None]
    hot = torch.zeros(1, d, dtype=F64)
    hot[0, int(gamma.abs().argmax())] = 1e6                                   # RMS supremum direction
    out = _apply(torch.cat([x, hot]), gamma, beta, kind, 1e-5)
    ratio = float(torch.linalg.vector_norm(out, dim=-1).max()) / radius
    assert ratio <= 1.0
    if kind is NormKind.RMSNORM:
        assert ratio > 0.999


def test_local_constant_uses_vmin_and_matches_trace_stat() -> None:
    """``lnK_lip_local = ||gamma||_inf / sqrt(v_min + eps)`` with the trace's own statistic."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 5, 8, generator=g, dtype=F64)
    x[0, 2] *= 1e-3
    gamma = torch.randn(8, generator=g, dtype=F64)
    for kind in KINDS:
        trace = apply_norm(x, NormWeights(gamma, None), kind, 1e-5)
        torch.testing.assert_close(trace.stat, compute_norm_statistic(x, kind), rtol=1e-14, atol=0)
        expected = float(gamma.abs().max()) / math.sqrt(float(trace.stat.min()) + 1e-5)
        assert compute_norm_lip_local(gamma, trace.stat[0], 1e-5) == pytest.approx(expected, rel=1e-14)


def test_hand_computed_layernorm() -> None:
    """x = (1, 2, 3): mean 2, sigma^2 = 2/3; with eps = 1/3, sigma^2 + eps = 1.
    gamma = (1, -2, 0.5): local = 2 / 1 = 2, global = 2 / sqrt(1/3) = 2 sqrt(3);
    beta = (0, 3, 4): reset = 2 sqrt(3) + 5. Since gamma != 1, ||J|| < 2 here but the bound is 2."""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    gamma, beta = torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([0.0, 3.0, 4.0], dtype=F64)
    eps = 1.0 / 3.0
    stat = compute_norm_statistic(x, NormKind.LAYERNORM)
    assert compute_norm_lip_local(gamma, stat, eps) == pytest.approx(2.0, rel=1e-15)
    assert compute_norm_lip_global(gamma, eps) == pytest.approx(2.0 * math.sqrt(3.0), rel=1e-15)
    assert compute_reset_radius(NormWeights(gamma, beta), NormKind.LAYERNORM) == pytest.approx(2 * math.sqrt(3) + 5)
    assert compute_reset_radius(NormWeights(gamma, beta), NormKind.RMSNORM) == pytest.approx(2 * math.sqrt(3))
    # gamma = 1, d = 3: the bracket P - zz^T/d has eigenvalues 0, eps/(sigma^2+eps) = 1/3 and 1, so ||J|| = 1.
    assert _spec(layernorm_jacobian(x[0], torch.ones(3, dtype=F64), eps)) == pytest.approx(1.0, rel=1e-14)


def test_embedding_radius() -> None:
    """Post-LN layer 1 without an embedding norm: max ||E_tok|| + max ||E_pos|| + max ||E_type|| (§8.1)."""
    tok = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)        # 5
    pos = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=F64)        # 2
    types = torch.tensor([[0.5, 0.0]], dtype=F64)                  # 0.5
    assert compute_embedding_radius(tok, pos, types) == pytest.approx(7.5)
    assert compute_embedding_radius(tok) == pytest.approx(5.0)

"""THEORY T19 (GELU/ReLU MLP) and T20 (SwiGLU): activation constants, local / stacked / ball / weights-only bounds
against exact Jacobians (``torch.autograd.functional.jacobian`` of plain reference FFNs), and hand-computed cases (§6).

The FFN acts tokenwise, so its block-(inf,2) norm is ``max_t ||J(x_t)||_2`` (§1.1): the exact per-token spectral norm
is the certified lower bound (checked once against the dense alternating maximisation of the full block Jacobian).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnstab_cli.arch.spec import FFNKind
from attnstab_cli.errors import UnsupportedError
from attnstab_cli.metrics.spectral import norm_2_to_inf
from attnstab_cli.metrics.lipschitz.ffn import (GELU_LIPSCHITZ, SILU_DMAX, SILU_DMIN, SILU_ZSTAR,
                                                activation_derivative, activation_lipschitz,
                                                compute_ffn_bound_tokens, compute_ffn_bound_weights,
                                                compute_mlp_bound_tokens, compute_mlp_bound_weights,
                                                compute_swiglu_ball, compute_swiglu_ball_simple,
                                                compute_swiglu_local_tokens, compute_swiglu_stacked_tokens,
                                                silu_derivative)
from attnstab_cli.model.activations import ACTIVATIONS
from lip_helpers import dense_alternating_max, jacobian_blocks

F64 = torch.float64
MLP_ACTS = {"gelu": F.gelu, "gelu_new": lambda a: F.gelu(a, approximate="tanh"), "relu": torch.relu}


def _mlp(x, w1, b1, w2, act):
    return MLP_ACTS[act](x @ w1 + b1) @ w2


def _swiglu(x, wg, wu, wd, bg=0.0, bu=0.0):
    return (F.silu(x @ wg + bg) * (x @ wu + bu)) @ wd


def _token_norms(f, x):
    """Exact ``||J(x_t)||_2`` for every token of ``x [T, d]`` (f maps one token ``[d] -> [d]``): ``[T]``."""
    return torch.stack([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(f, xt), ord=2) for xt in x])


def _random_mlp(seed, d=6, m=10):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(d, m, generator=g, dtype=F64) / math.sqrt(d), torch.randn(m, generator=g, dtype=F64),
            torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(m), g)


def _random_gated(seed, d=6, m=8):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(d, m, generator=g, dtype=F64) / math.sqrt(d),
            torch.randn(d, m, generator=g, dtype=F64) / math.sqrt(d),
            torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(m), g)


# ------------------------------------------------------------------------------------------------ constants (T19, T20)

def test_gelu_constants() -> None:
    """T19: max GELU' = 1.12890 (erf, at sqrt 2) / 1.12899 (tanh); min -0.129; L_phi = 1.129 covers both."""
    z = torch.linspace(-8, 8, 1_600_001, dtype=F64)
    for name, peak in (("gelu", 1.12890), ("gelu_new", 1.12899)):
        slope = activation_derivative(z, name)
        assert float(slope.max()) == pytest.approx(peak, abs=1e-5)
        assert float(slope.min()) == pytest.approx(-0.129, abs=1e-3)
        assert float(slope.abs().max()) <= GELU_LIPSCHITZ == activation_lipschitz(name)
    assert float(z[activation_derivative(z, "gelu").argmax()]) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert activation_lipschitz("relu") == 1.0 and activation_lipschitz("silu") == SILU_DMAX


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivative_matches_model_activation(name: str) -> None:
    """``activation_derivative`` is the derivative of the activation the forward pass uses (autograd)."""
    g = torch.Generator().manual_seed(0)
    a = torch.cat([4 * torch.randn(200, generator=g, dtype=F64), torch.linspace(-6, 6, 97, dtype=F64) + 1e-3])
    auto = torch.autograd.functional.jacobian(lambda u: ACTIVATIONS[name](u).sum(), a)
    torch.testing.assert_close(activation_derivative(a, name), auto, rtol=1e-12, atol=1e-12)


def test_silu_constants() -> None:
    """T20: silu'(z*) = 1.0998393 is the maximum (silu''(z*) = 0), min silu' = 1 - max at -z*, silu'(z) + silu'(-z) = 1,
    sup_{|z|<=A} |silu| = A sigma(A), sup_{|z|<=A} |silu'| = silu'(min(A, z*))."""
    zs = torch.tensor(SILU_ZSTAR, dtype=F64)
    second = torch.autograd.functional.jacobian(silu_derivative, zs)
    assert abs(float(second)) <= 1e-9
    assert float(silu_derivative(zs)) == pytest.approx(1.0998393, abs=1e-7)
    assert float(silu_derivative(zs)) <= SILU_DMAX <= float(silu_derivative(zs)) + 1e-12
    z = torch.linspace(-12, 12, 2_400_001, dtype=F64)
    d = silu_derivative(z)
    assert SILU_DMAX - 1e-7 <= float(d.max()) <= SILU_DMAX
    assert SILU_DMIN <= float(d.min()) <= SILU_DMIN + 1e-7
    assert SILU_DMIN == pytest.approx(-0.0998393, abs=1e-7)
    torch.testing.assert_close(d + silu_derivative(-z), torch.ones_like(z), rtol=0, atol=1e-14)
    for big_a in (0.3, 1.0, 2.0, SILU_ZSTAR, 3.0, 7.5):
        inside = z.abs() <= big_a
        assert float(F.silu(z[inside]).abs().max()) == pytest.approx(big_a * torch.sigmoid(torch.tensor(big_a)).item(),
                                                                    rel=1e-5)
        expect = float(silu_derivative(torch.tensor(min(big_a, SILU_ZSTAR), dtype=F64)))
        assert float(d[inside].abs().max()) == pytest.approx(expect, abs=1e-7)


# ------------------------------------------------------------------------------------------------ GELU / ReLU MLP (T19)

@pytest.mark.parametrize("act", sorted(MLP_ACTS))
def test_mlp_bounds_dominate_exact_jacobian(act: str) -> None:
    """T19: ``||J(x_t)|| <= ||W1|| max_k |phi'(a_tk)| ||W2|| <= L_phi ||W1|| ||W2||`` at tokens of several scales;
    the weights-only bound also dominates difference quotients of random pairs."""
    for seed in range(4):
        w1, b1, w2, g = _random_mlp(seed)
        b_out = torch.randn(6, generator=g, dtype=F64)                        # output bias: no effect on J
        x = torch.randn(5, 6, generator=g, dtype=F64) * torch.tensor([[0.1], [0.5], [1.0], [2.0], [5.0]], dtype=F64)
        exact = _token_norms(lambda u: _mlp(u, w1, b1, w2, act) + b_out, x)
        local = compute_mlp_bound_tokens(x, w1, b1, w2, act)
        weights = compute_mlp_bound_weights(w1, w2, act)
        assert bool((local >= exact * (1 - 1e-12)).all())
        assert bool((local <= weights * (1 + 1e-12)).all())
        ffn = {"w_in": w1, "b_in": b1, "w_out": w2, "b_out": b_out}
        torch.testing.assert_close(compute_ffn_bound_tokens(ffn, FFNKind.MLP, act, x), local, rtol=0, atol=0)
        assert compute_ffn_bound_weights(ffn, FFNKind.MLP, act, 123.0) == weights
        a, b = torch.randn(2, 40, 6, generator=g, dtype=F64)
        quot = (torch.linalg.vector_norm(_mlp(a, w1, b1, w2, act) - _mlp(b, w1, b1, w2, act), dim=-1)
                / torch.linalg.vector_norm(a - b, dim=-1))
        assert float(quot.max()) <= weights


def test_mlp_tokenwise_block_norm() -> None:
    """§1.1: for a tokenwise map the block-(inf,2) norm is ``max_t ||J_tt||``; the dense alternating maximisation of
    the full block Jacobian agrees and stays below ``max_t`` of the calibrated bound."""
    w1, b1, w2, g = _random_mlp(7)
    x = 2 * torch.randn(4, 6, generator=g, dtype=F64)
    blocks = jacobian_blocks(lambda u: _mlp(u, w1, b1, w2, "gelu"), x)                  # [T, T, d, d]
    off = blocks.clone()
    off[range(4), range(4)] = 0
    assert float(off.abs().max()) == 0.0
    lower, _ = dense_alternating_max(blocks, list(range(4)), restarts=2, seed=1)
    exact = float(_token_norms(lambda u: _mlp(u, w1, b1, w2, "gelu"), x).max())
    assert lower == pytest.approx(exact, rel=1e-5)
    assert float(compute_mlp_bound_tokens(x, w1, b1, w2, "gelu").max()) >= lower


def test_mlp_hand_cases() -> None:
    """W1 = I, W2 = -2 I: ``J = -2 diag(phi'(a))`` so ``||J|| = 2 max_k |phi'(a_k)|`` and the local bound is exact,
    also when every slope is negative (a = (-1.5, -2, -3): the largest |phi'| is GELU'(-1.5) = -0.12858...).
    Weights-only with W1 = diag(2, 1), W2 = diag(3, 0.5): 1.129 * 2 * 3 (GELU), 6 (ReLU). At a = sqrt 2 (GELU's
    steepest point) the weights-only constant is tight to 1e-4."""
    eye = torch.eye(3, dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    for a in ([-1.5, -2.0, -3.0], [0.3, -0.7, 1.9], [math.sqrt(2), 0.0, -5.0]):
        x = torch.tensor([a], dtype=F64)
        for act in ("gelu", "gelu_new"):
            exact = _token_norms(lambda u: _mlp(u, eye, zero, -2 * eye, act), x)
            local = compute_mlp_bound_tokens(x, eye, None, -2 * eye, act)
            assert float(local[0]) == pytest.approx(float(exact[0]), rel=1e-13)
    phi1 = 0.5 * (1 + math.erf(-1.5 / math.sqrt(2))) - 1.5 * math.exp(-1.125) / math.sqrt(2 * math.pi)
    x = torch.tensor([[-1.5, -2.0, -3.0]], dtype=F64)
    assert float(compute_mlp_bound_tokens(x, eye, None, -2 * eye, "gelu")[0]) == pytest.approx(2 * abs(phi1),
                                                                                              rel=1e-14)
    w1, w2 = torch.diag(torch.tensor([2.0, 1.0], dtype=F64)), torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    assert compute_mlp_bound_weights(w1, w2, "gelu") == pytest.approx(1.129 * 6, rel=1e-15)
    assert compute_mlp_bound_weights(w1, w2, "relu") == pytest.approx(6.0, rel=1e-15)
    steep = torch.tensor([[math.sqrt(2), -9.0, -9.0]], dtype=F64)
    exact = float(_token_norms(lambda u: _mlp(u, eye, zero, eye, "gelu"), steep)[0])
    assert 1.0 <= compute_mlp_bound_weights(eye, eye, "gelu") / exact <= 1 + 1e-4


def test_relu_kink_counts_in_local_bound() -> None:
    """At x = 0 with b1 = 0 every pre-activation sits on ReLU's kink. ``f(x) = relu(x W1) W2`` is positively
    homogeneous, so the local constant at 0 is at least ``||f(v)|| / ||v||`` for every v > 0; the tier-2 bound must
    use the one-sided slope 1 there (``||W1|| ||W2||``), not autograd's relu'(0) = 0."""
    w1, _, w2, g = _random_mlp(3)
    x0 = torch.zeros(1, 6, dtype=F64)
    local = float(compute_mlp_bound_tokens(x0, w1, torch.zeros(10, dtype=F64), w2, "relu")[0])
    v = torch.randn(200, 6, generator=g, dtype=F64)
    ratio = torch.linalg.vector_norm(torch.relu(v @ w1) @ w2, dim=-1) / torch.linalg.vector_norm(v, dim=-1)
    assert float(ratio.max()) > 0.1
    assert local >= float(ratio.max())
    assert local == pytest.approx(compute_mlp_bound_weights(w1, w2, "relu"), rel=1e-14)


# ------------------------------------------------------------------------------------------------ SwiGLU (T20)

def _aligned_points(wg, wu, r2):
    """Points on the ball's sphere along the columns of W_g and W_u with the largest norms (|a_k| = A, |b_k| = B)."""
    pts = []
    for w in (wg, wu):
        col = w[:, int(torch.linalg.vector_norm(w, dim=0).argmax())]
        pts += [r2 * col / torch.linalg.vector_norm(col), -r2 * col / torch.linalg.vector_norm(col)]
    return torch.stack(pts)


def _maximised_points(f, x0, r2, steps=25, lr=0.2):
    """Projected gradient ascent of ``||J(x)||_2`` inside the ball ``||x|| <= r2``, one start per row of ``x0``."""
    out = []
    for x in x0:
        x = x.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            jac = torch.autograd.functional.jacobian(f, x, create_graph=True)
            (grad,) = torch.autograd.grad(torch.linalg.matrix_norm(jac, ord=2), x)
            with torch.no_grad():
                x = x + lr * r2 * grad / grad.norm().clamp_min(1e-300)
                x = x * min(1.0, r2 / float(x.norm()))
        out.append(x.detach())
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(3))
def test_swiglu_bounds_dominate_exact_jacobian(seed: int) -> None:
    """T20: local, stacked and ball bounds >= ||J|| at random, column-aligned and locally maximised points of the ball;
    local <= ball <= simple ball; pairs in the ball have difference quotients <= ball."""
    wg, wu, wd, g = _random_gated(seed)
    r2 = (1.0, 2.5, 4.0)[seed]
    f = lambda u: _swiglu(u, wg, wu, wd)
    rnd = torch.randn(6, 6, generator=g, dtype=F64)
    rnd = rnd / torch.linalg.vector_norm(rnd, dim=-1, keepdim=True) * r2 * torch.rand(6, 1, generator=g, dtype=F64)
    x = torch.cat([rnd, _aligned_points(wg, wu, r2), _maximised_points(f, rnd[:2], r2)])
    assert float(torch.linalg.vector_norm(x, dim=-1).max()) <= r2 * (1 + 1e-12)
    exact = _token_norms(f, x)
    local = compute_swiglu_local_tokens(x, wg, wu, wd)
    stacked = compute_swiglu_stacked_tokens(x, wg, wu, wd)
    ball = compute_swiglu_ball(r2, wg, wu, wd)
    assert bool((local >= exact * (1 - 1e-12)).all()) and bool((stacked >= exact * (1 - 1e-12)).all())
    assert float(exact.max()) <= ball and float(local.max()) <= ball * (1 + 1e-12)
    assert ball <= compute_swiglu_ball_simple(r2, wg, wu, wd) * (1 + 1e-12)
    ffn = {"w_gate": wg, "w_up": wu, "w_out": wd}
    torch.testing.assert_close(compute_ffn_bound_tokens(ffn, FFNKind.GATED, "silu", x), local, rtol=0, atol=0)
    assert compute_ffn_bound_weights(ffn, FFNKind.GATED, "silu", r2) == ball
    a = torch.randn(200, 6, generator=g, dtype=F64)
    b = a + 0.3 * torch.randn(200, 6, generator=g, dtype=F64)
    a, b = (u * (r2 / torch.linalg.vector_norm(u, dim=-1, keepdim=True)).clamp_max(1.0) for u in (a, b))
    quot = torch.linalg.vector_norm(f(a) - f(b), dim=-1) / torch.linalg.vector_norm(a - b, dim=-1)
    assert float(quot.max()) <= ball


def test_swiglu_ball_with_biases() -> None:
    """§6.2 with gate/up biases: ``|a_k| <= R2 ||W_g col k|| + |b_gk|``; the ball bound covers ||J|| at points of the
    ball (random and maximised) and grows with the biases."""
    wg, wu, wd, g = _random_gated(11)
    bg, bu = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    r2 = 2.0
    f = lambda u: _swiglu(u, wg, wu, wd, bg, bu)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * r2
    x = torch.cat([x, _maximised_points(f, x[:2], r2)])
    ball = compute_swiglu_ball(r2, wg, wu, wd, bg, bu)
    assert float(_token_norms(f, x).max()) <= ball
    assert ball > compute_swiglu_ball(r2, wg, wu, wd)


def test_swiglu_hand_cases() -> None:
    """d = m = 1, f(x) = w silu(g x) (u x): ``J = w (silu'(g x) g u x + silu(g x) u)``.
    g = 1.5, u = 0.8, w = -2. Local at x = 1.2: both terms positive, so the local form is exact. Ball at R2 = 1.2:
    A = 1.8 < z*, B = 0.96, so ``2 (silu'(1.8) 1.5 0.96 + 0.8 * 1.8 sigma(1.8))`` = |J(1.2)|, exact. R2 = 2: A = 3 > z*,
    slope max silu' = 1.0998393: ``2 (1.0998393 * 1.5 * 1.6 + 0.8 * 3 sigma(3))``. Simple form at R2 = 2:
    ``2 * 2 (1.0999 * 1.5 * 0.8 + 0.8 * 1.5)``. With biases b_g = 0.3, b_u = 0.2 at R2 = 1 the ball bound is again
    |J(1)|. Stacked: with g = x = 1 and u = sqrt(silu(1) / silu'(1)) the vectors
    (silu'(a) b, silu(a)) and (g, u) are parallel, so Cauchy-Schwarz is an equality and the stacked form is exact."""
    sig = lambda z: 1 / (1 + math.exp(-z))
    dsilu = lambda z: sig(z) * (1 + z * (1 - sig(z)))
    t = lambda v: torch.tensor([[v]], dtype=F64)
    wg, wu, wd = t(1.5), t(0.8), t(-2.0)
    jac = lambda x: abs(-2 * (dsilu(1.5 * x) * 1.5 * 0.8 * x + 1.5 * x * sig(1.5 * x) * 0.8))
    assert float(compute_swiglu_local_tokens(t(1.2), wg, wu, wd)[0]) == pytest.approx(jac(1.2), rel=1e-14)
    ball = 2 * (dsilu(1.8) * 1.5 * 0.96 + 0.8 * 1.8 * sig(1.8))
    assert compute_swiglu_ball(1.2, wg, wu, wd) == pytest.approx(ball, rel=1e-14)
    assert ball == pytest.approx(jac(1.2), rel=1e-14)
    assert compute_swiglu_ball(2.0, wg, wu, wd) == pytest.approx(2 * (SILU_DMAX * 1.5 * 1.6 + 0.8 * 3 * sig(3)),
                                                                 rel=1e-14)
    assert SILU_DMAX == pytest.approx(1.0998393, abs=1e-7)
    # biases b_g = 0.3, b_u = 0.2 at R2 = 1: A = 1.5 + 0.3 = 1.8, B = 0.8 + 0.2 = 1, attained at x = 1 (exact again)
    biased = compute_swiglu_ball(1.0, wg, wu, wd, torch.tensor([0.3], dtype=F64), torch.tensor([0.2], dtype=F64))
    assert biased == pytest.approx(2 * (dsilu(1.8) * 1.5 * 1.0 + 0.8 * 1.8 * sig(1.8)), rel=1e-14)
    exact_biased = float(_token_norms(lambda x: _swiglu(x, wg, wu, wd, 0.3, 0.2), t(1.0))[0])
    assert biased == pytest.approx(exact_biased, rel=1e-13)
    assert compute_swiglu_ball_simple(2.0, wg, wu, wd) == pytest.approx(4 * (1.0999 * 1.2 + 1.2), rel=1e-14)
    u = math.sqrt(1 * sig(1) / dsilu(1))
    stacked = float(compute_swiglu_stacked_tokens(t(1.0), t(1.0), t(u), t(1.0))[0])
    exact = dsilu(1) * u * 1 + sig(1) * u
    assert stacked == pytest.approx(exact, rel=1e-14)
    assert stacked == pytest.approx(float(_token_norms(lambda x: _swiglu(x, t(1.0), t(u), t(1.0)), t(1.0))[0]),
                                    rel=1e-13)


def test_swiglu_ball_uses_column_norms() -> None:
    """``||W||_{2->inf}`` of ``x -> xW`` is the largest column norm: W_g = [[3, 0], [4, 1]] has columns of norm 5 and 1
    (rows 3 and sqrt 17). With W_u = I, W_d = I (norms 1), R2 = 1: A = 5 > z*, B = 1,
    ball = 1.0998393 * ||W_g|| * 1 + 1 * 5 sigma(5)."""
    wg = torch.tensor([[3.0, 0.0], [4.0, 1.0]], dtype=F64)
    eye = torch.eye(2, dtype=F64)
    assert float(norm_2_to_inf(wg)) == pytest.approx(5.0, rel=1e-15)
    spec = float(torch.linalg.matrix_norm(wg, ord=2))
    expected = SILU_DMAX * spec + 5 / (1 + math.exp(-5))
    assert compute_swiglu_ball(1.0, wg, eye, eye) == pytest.approx(expected, rel=1e-14)
    assert compute_swiglu_ball_simple(1.0, wg, eye, eye) == pytest.approx(1.0999 * spec + 5, rel=1e-14)


def test_gated_ffn_needs_a_supported_activation() -> None:
    """Gated FFNs with an activation without implemented constants: a clear UnsupportedError."""
    wg, wu, wd, _ = _random_gated(0)
    ffn = {"w_gate": wg, "w_up": wu, "w_out": wd}
    with pytest.raises(UnsupportedError):
        compute_ffn_bound_weights(ffn, FFNKind.GATED, "gelu_new", 1.0)
    with pytest.raises(UnsupportedError):
        compute_ffn_bound_tokens(ffn, FFNKind.GATED, "relu", torch.zeros(1, 6, dtype=F64))


# ------------------------------------------------------------------------------------------- gated GELU (T36, §18.6)

def test_gated_gelu_constants_on_a_grid() -> None:
    """T36: max exact gelu' at sqrt 2 is 1.1289041 (the constant rounds it up), min -0.128904 at -sqrt 2;
    gelu'(z) + gelu'(-z) = 1; sup_{|z|<=A} |gelu| = A Phi(A); sup_{|z|<=A} |gelu'| = gelu'(min(A, sqrt 2))."""
    from attnstab_cli.metrics.lipschitz.ffn import GATED_ACTIVATIONS, GELU_DMAX, GELU_ZSTAR

    z = torch.linspace(-12, 12, 2_400_001, dtype=F64)
    autograd_slope = torch.func.vmap(torch.func.grad(lambda u: F.gelu(u)))(z)
    act = GATED_ACTIVATIONS["gelu"]
    torch.testing.assert_close(act.derivative(z), autograd_slope, rtol=0, atol=1e-14)
    torch.testing.assert_close(act.fn(z), F.gelu(z), rtol=0, atol=1e-14)
    i = int(autograd_slope.argmax())
    assert float(z[i]) == pytest.approx(GELU_ZSTAR, abs=1e-5)
    assert 0 <= GELU_DMAX - float(autograd_slope.max()) < 1e-6
    assert float(autograd_slope.min()) == pytest.approx(1 - float(autograd_slope.max()), abs=1e-10)
    torch.testing.assert_close(act.derivative(z) + act.derivative(-z), torch.ones_like(z), rtol=0, atol=1e-14)
    for a in (0.3, 1.0, 1.41, 2.0, 5.0):
        inside = z.abs() <= a
        assert float(F.gelu(z[inside]).abs().max()) <= float(act.fn(torch.tensor(a, dtype=F64))) + 1e-12
        sup_slope = act.derivative(torch.tensor(min(a, GELU_ZSTAR), dtype=F64))
        assert float(autograd_slope[inside].abs().max()) <= float(sup_slope) + 1e-12


def _geglu(x, wg, wu, wd):
    return (F.gelu(x @ wg) * (x @ wu)) @ wd


@pytest.mark.parametrize("seed", range(3))
def test_gated_gelu_bounds_dominate_exact_jacobian(seed: int) -> None:
    """T36: gated-GELU local, stacked and ball bounds >= ||J|| at random, column-aligned and locally maximised points
    of the ball; pairs in the ball have difference quotients <= the ball bound."""
    wg, wu, wd, g = _random_gated(seed + 10)
    r2 = (1.0, 2.5, 4.0)[seed]
    f = lambda u: _geglu(u, wg, wu, wd)
    rnd = torch.randn(6, 6, generator=g, dtype=F64)
    rnd = rnd / torch.linalg.vector_norm(rnd, dim=-1, keepdim=True) * r2 * torch.rand(6, 1, generator=g, dtype=F64)
    x = torch.cat([rnd, _aligned_points(wg, wu, r2), _maximised_points(f, rnd[:2], r2)])
    exact = _token_norms(f, x)
    local = compute_swiglu_local_tokens(x, wg, wu, wd, activation="gelu")
    stacked = compute_swiglu_stacked_tokens(x, wg, wu, wd, activation="gelu")
    ball = compute_swiglu_ball(r2, wg, wu, wd, activation="gelu")
    assert bool((local >= exact * (1 - 1e-12)).all()) and bool((stacked >= exact * (1 - 1e-12)).all())
    assert float(exact.max()) <= ball and float(local.max()) <= ball * (1 + 1e-12)
    ffn = {"w_gate": wg, "w_up": wu, "w_out": wd}
    torch.testing.assert_close(compute_ffn_bound_tokens(ffn, FFNKind.GATED, "gelu", x), local, rtol=0, atol=0)
    assert compute_ffn_bound_weights(ffn, FFNKind.GATED, "gelu", r2) == ball
    assert compute_ffn_bound_weights(ffn, FFNKind.GATED, "silu", r2) != ball       # the activation is read
    a = torch.randn(200, 6, generator=g, dtype=F64)
    b = a + 0.3 * torch.randn(200, 6, generator=g, dtype=F64)
    a, b = (u * (r2 / torch.linalg.vector_norm(u, dim=-1, keepdim=True)).clamp_max(1.0) for u in (a, b))
    quot = torch.linalg.vector_norm(f(a) - f(b), dim=-1) / torch.linalg.vector_norm(a - b, dim=-1)
    assert float(quot.max()) <= ball

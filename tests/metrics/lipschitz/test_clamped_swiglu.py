"""gpt-oss's clamped SwiGLU expert (THEORY §18.7): its constants on a grid (as T36 for GELU), the expert's local and
ball bounds against autograd Jacobians, and T37 on gpt-oss-style MoE layers (router bias, a softmax over the
selected logits, expert biases, clamped experts) at points away from routing switches and clamp kinks."""
from __future__ import annotations

import pytest
import torch

from attnstab_cli.arch.spec import ExpertGLU, ExpertSelection, RouterScore
from attnstab_cli.metrics.lipschitz.clamped_swiglu import (
    SILU_NEG_MAX, SILU_ZMIN, compute_clamped_ball, compute_clamped_local_tokens, gate_slope_sup, gate_value_sup,
    up_value_sup,
)
from attnstab_cli.metrics.lipschitz.ffn import SILU_DMAX, SILU_DMIN, SILU_ZSTAR
from attnstab_cli.metrics.lipschitz.moe import compute_expert_balls, compute_moe_ball, compute_moe_local_tokens
from attnstab_cli.metrics.spectral import spectral_norm_value
from attnstab_cli.model.blocks import route_tokens, run_moe
from attnstab_cli.model.config import ModelConfig, MoEConfig
from attnstab_cli.model.experts import GLUForm, compute_expert_output, preactivations
from attnstab_cli.model.weights import MoEWeights

F64 = torch.float64
D, M, E, K = 12, 10, 6, 2


def _form(alpha: float = 1.702, limit: float = 1.5) -> GLUForm:
    return GLUForm(ExpertGLU.CLAMPED_SWIGLU, "silu", alpha, limit)


def _slope_on(z: torch.Tensor, fn) -> torch.Tensor:
    """Elementwise derivative of ``fn`` by autograd (the kinks of the grid are avoided by the callers)."""
    z = z.clone().requires_grad_(True)
    fn(z).sum().backward()
    return z.grad


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.702, 3.0])
def test_psi_derivative_has_the_extrema_of_silu_derivative_rescaled(alpha: float) -> None:
    """``d/dz z sigma(alpha z)``: max 1.0998393 at ``z*/alpha``, min -0.0998393 at ``-z*/alpha``; psi's minimum is
    ``-0.2784645 / alpha`` at ``-1.2784645 / alpha`` (a grid of step 1e-5 / alpha)."""
    z = torch.arange(-12.0, 12.0, 1e-5, dtype=F64) / alpha
    slope = _slope_on(z, lambda v: v * torch.sigmoid(alpha * v))
    assert abs(float(slope.max()) - SILU_DMAX) < 1e-7 and float(slope.max()) <= SILU_DMAX
    assert abs(float(slope.min()) - SILU_DMIN) < 1e-7 and float(slope.min()) >= SILU_DMIN - 1e-12
    assert abs(float(z[slope.argmax()]) - SILU_ZSTAR / alpha) < 2e-5 / alpha
    assert abs(float(z[slope.argmin()]) + SILU_ZSTAR / alpha) < 2e-5 / alpha
    psi = z * torch.sigmoid(alpha * z)
    assert abs(float(psi.min()) + SILU_NEG_MAX / alpha) < 1e-10
    assert abs(float(z[psi.argmin()]) + SILU_ZMIN / alpha) < 2e-5 / alpha
    assert abs(SILU_ZMIN - 1.0 - SILU_NEG_MAX) < 1e-15


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.702, 0.8), (1.0, 2.0), (3.0, 0.3)])
def test_ball_suprema_match_a_grid(alpha: float, limit: float) -> None:
    """``sup_{|a| <= A} |phi_g'|``, ``sup |phi_g|`` and ``sup_{|b| <= B} |phi_u|`` of the clamped unit equal the
    maxima over a fine grid of the interval (attained up to the grid step, never exceeded)."""
    form = _form(alpha, limit)
    for big in (0.05, 0.4, 1.0, 1.3, 2.5, 6.0, 7.5, 20.0):
        grid = torch.linspace(-big, big, 400_001, dtype=F64)
        near = torch.tensor([limit - 1e-10, limit + 1e-10, -limit + 1e-10, -limit - 1e-10], dtype=F64)
        grid = torch.cat([grid[(grid.abs() - limit).abs() > 1e-9], near[near.abs() <= big]])   # beside the kinks
        slope = _slope_on(grid, form.gate).abs().max()
        value = form.gate(grid).abs().max()
        up = form.up(grid).abs().max()
        closed = [float(f(torch.tensor([big], dtype=F64), form)) for f in (gate_slope_sup, gate_value_sup,
                                                                             up_value_sup)]
        for got, want in zip((slope, value, up), closed):
            assert float(got) <= want * (1 + 1e-12) + 1e-15, (big, float(got), want)
            assert float(got) >= want - 1e-6 * max(1.0, want), (big, float(got), want)


def _expert(seed: int, bias: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)           # noqa: E731
    ex = {"w_gate": rnd(D, M, s=0.5), "w_up": rnd(D, M, s=0.5), "w_out": rnd(M, D, s=0.5)}
    if bias:
        ex.update(b_gate=rnd(M, s=0.5), b_up=rnd(M, s=0.5), b_out=rnd(D, s=0.5))
    return ex


def _norms(ex: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(spectral_norm_value(ex[k])) for k in ("w_gate", "w_up", "w_out")}


def _off_kinks(x: torch.Tensor, experts: list[dict[str, torch.Tensor]], limit: float,
               gap: float = 1e-4) -> torch.Tensor:
    """Rows of ``x`` whose gate and up pre-activations are at least ``gap`` from every clamp kink."""
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    for ex in experts:
        a, b = preactivations(x, ex)
        keep &= ((a - limit).abs() > gap).all(-1) & ((b.abs() - limit).abs() > gap).all(-1)
    return keep


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bias", [True, False])
def test_expert_local_and_ball_bounds_cover_the_jacobian(seed: int, bias: bool) -> None:
    """At random points (some pre-activations beyond the clamps) ``||J(x)||_2 <= local <= ball``, and the ball's
    magnitude bound holds for ``||E(x)||``, at radii 1, 3 and 8."""
    form, ex = _form(), _expert(seed, bias)
    norms = _norms(ex)
    for radius in (1.0, 3.0, 8.0):
        lip, mag = compute_clamped_ball(radius, ex, norms, form)
        x = torch.randn(400, D, generator=torch.Generator().manual_seed(seed + 10), dtype=F64)
        x = radius * x / x.norm(dim=-1, keepdim=True) * torch.rand(400, 1, generator=torch.Generator().manual_seed(1),
                                                                  dtype=F64) ** 0.2
        x = x[_off_kinks(x, [ex], form.limit)][:60]
        a, b = preactivations(x, ex)
        if radius > 1:
            assert bool((a > form.limit).any()) and bool((b.abs() > form.limit).any())
        local = compute_clamped_local_tokens(x, ex, norms, form)
        assert float(compute_expert_output(x, ex, form).norm(dim=-1).max()) <= mag
        assert float(local.max()) <= lip * (1 + 1e-12)
        for t in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: compute_expert_output(v, ex, form), x[t])
            assert float(torch.linalg.matrix_norm(jac, ord=2)) <= float(local[t]) * (1 + 1e-9)


def test_clamps_enter_the_local_bound() -> None:
    """A point whose every gate pre-activation is beyond the limit has no gate pathway: the bound's gate term is 0
    and the bound equals ``||W_d|| ||W_u|| max_k |psi(L)|``; dropping the clamps would give a larger value."""
    form, ex = _form(limit=0.1), _expert(3, bias=False)
    ex["b_gate"] = torch.full((M,), 50.0, dtype=F64)                        # a > L everywhere near x = 0
    norms = _norms(ex)
    x = 0.01 * torch.randn(1, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = float(compute_clamped_local_tokens(x, ex, norms, form)[0])
    _, b = preactivations(x, ex)
    psi_l = 0.1 * float(torch.sigmoid(torch.tensor(0.1 * form.alpha, dtype=F64)))
    assert got == pytest.approx(norms["w_out"] * norms["w_up"] * psi_l * float((b.abs() <= 0.1).any()), rel=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: compute_expert_output(v, ex, form), x[0])
    assert float(torch.linalg.matrix_norm(jac, ord=2)) <= got * (1 + 1e-12)
    assert float(compute_clamped_local_tokens(x, ex, norms, _form(limit=1e9))[0]) > 10 * got


def _gpt_oss_moe(seed: int) -> tuple[ModelConfig, MoEWeights]:
    """A gpt-oss-style MoE layer: router with bias, top-k, a softmax over the selected logits, biased clamped
    SwiGLU experts (alpha 1.702, limit 1.5)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)           # noqa: E731
    moe = MoEConfig(score=RouterScore.SOFTMAX, selection=ExpertSelection.TOP_K, n_experts=E, top_k=K,
                    d_ff_expert=M, renormalize=True, moe_layers=(True,), glu=ExpertGLU.CLAMPED_SWIGLU,
                    glu_alpha=1.702, glu_limit=1.5)
    cfg = ModelConfig(family="gpt_oss_like", model_type=None, layout=None, n_layers=1, d_model=D, n_heads=1,
                      n_kv_heads=1, head_dim=D, d_ff=M, vocab_size=2, max_positions=None, norm_eps=1e-6,
                      activation="silu", rope=None, sliding_windows=(None,), moe=moe)
    experts = {"w_gate": rnd(E, D, M, s=0.5), "w_up": rnd(E, D, M, s=0.5), "w_out": rnd(E, M, D, s=0.5),
               "b_gate": rnd(E, M, s=0.5), "b_up": rnd(E, M, s=0.5), "b_out": rnd(E, D, s=0.5)}
    return cfg, MoEWeights(router=rnd(D, E), router_bias=rnd(E), score_bias=None, experts=experts)


def _points(cfg: ModelConfig, w: MoEWeights, n: int, scale: float, seed: int) -> torch.Tensor:
    """``n`` tokens of norm about ``scale``: routing at least 1e-3 (softmax score) from a switch, every expert's
    pre-activations at least 1e-4 from a clamp kink."""
    x = scale * torch.randn(8 * n, D, generator=torch.Generator().manual_seed(seed), dtype=F64) / D ** 0.5
    top = (x @ w.router + w.router_bias).softmax(-1).topk(K + 1, dim=-1).values
    keep = (top[:, K - 1] - top[:, K] > 1e-3) & _off_kinks(x, [w.expert(e) for e in range(E)], cfg.moe.glu_limit)
    assert int(keep.sum()) >= n
    return x[keep][:n]


@pytest.mark.parametrize("seed", range(4))
def test_t37_gpt_oss_style_local_bound_covers_the_jacobian(seed: int) -> None:
    """T37 with clamped experts: the exact ``||J(x)||_2`` (autograd, routing fixed) <= the tier-2 bound."""
    cfg, w = _gpt_oss_moe(seed)
    for scale in (0.5, 2.0, 6.0):
        x = _points(cfg, w, 12, scale, seed)
        route = route_tokens(x[None], w, cfg)
        bound = compute_moe_local_tokens(x, w, cfg.moe, route, 0, "silu")
        for t in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: run_moe(v[None, None], w, cfg)[0][0, 0], x[t])
            lower = float(torch.linalg.matrix_norm(jac, ord=2))
            assert lower <= bound[t] * (1 + 1e-9), (scale, t, lower, float(bound[t]))


def test_t37_gpt_oss_style_ball_bound_covers_the_ball() -> None:
    """Tier 1 inside a routing region: every ``||J(x)||`` and every tier-2 value in the ball stays below it; the
    experts' magnitude bounds hold."""
    cfg, w = _gpt_oss_moe(7)
    for radius in (1.0, 4.0):
        ball = compute_moe_ball(radius, w, cfg.moe, "silu")
        _, mags = compute_expert_balls(radius, w, "silu", moe=cfg.moe)
        x = _points(cfg, w, 20, radius * D ** 0.5, 11)
        x = x / x.norm(dim=-1, keepdim=True) * radius * torch.rand(x.shape[0], 1, dtype=F64,
                                                                     generator=torch.Generator().manual_seed(2)) ** 0.2
        route = route_tokens(x[None], w, cfg)
        assert float(compute_moe_local_tokens(x, w, cfg.moe, route, 0, "silu").max()) <= ball * (1 + 1e-12)
        for e in range(E):
            assert float(compute_expert_output(x, w.expert(e), GLUForm(ExpertGLU.CLAMPED_SWIGLU, "silu", 1.702,
                                                                       1.5)).norm(dim=-1).max()) <= mags[e]
        for t in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v: run_moe(v[None, None], w, cfg)[0][0, 0], x[t])
            assert float(torch.linalg.matrix_norm(jac, ord=2)) <= ball

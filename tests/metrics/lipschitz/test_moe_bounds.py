"""THEORY §18.7: the mixture-of-experts bounds inside a routing region against autograd Jacobians with the routing
fixed (T37), and the gate map's inf->1 norm against vertex enumeration (T38)."""
from __future__ import annotations

import itertools

import pytest
import torch

from attnstab_cli.arch.spec import ExpertSelection, RouterScore, SharedGate
from attnstab_cli.metrics.lipschitz.moe import (compute_expert_balls, compute_gate_jacobian, compute_gate_theta,
                                                compute_moe_ball, compute_moe_local_tokens)
from attnstab_cli.model.blocks import route_tokens, run_moe
from attnstab_cli.model.config import ModelConfig, MoEConfig
from attnstab_cli.model.weights import MoEWeights
from lip_helpers import theta_exact

F64 = torch.float64
D, M, E, K = 12, 10, 6, 2

# (score, renormalize, selection, shared gate, scaling, router bias, score bias): Mixtral, Qwen2-MoE (plain softmax
# gates, sigmoid shared gate), Qwen3-MoE (renormalized), DeepSeek V3 (sigmoid, correction bias, 3 groups of which 2
# are searched, scaling, a constant shared expert), DeepSeek V2 (softmax gates over all E not renormalized, groups
# ranked by their best score, V2's scaling 16, a constant shared expert), gpt-oss-like (router bias)
STYLES = {
    "mixtral": (RouterScore.SOFTMAX, True, ExpertSelection.TOP_K, None, 1.0, False, False),
    "qwen2_moe": (RouterScore.SOFTMAX, False, ExpertSelection.TOP_K, SharedGate.SIGMOID, 1.0, False, False),
    "qwen3_moe": (RouterScore.SOFTMAX, True, ExpertSelection.TOP_K, None, 1.0, False, False),
    "deepseek": (RouterScore.SIGMOID, True, ExpertSelection.GROUP_TOP_K, SharedGate.CONSTANT, 2.5, False, True),
    "deepseek_v2": (RouterScore.SOFTMAX, False, ExpertSelection.GROUP_MAX_TOP_K, SharedGate.CONSTANT, 16.0, False,
                    False),
    "sigmoid_plain": (RouterScore.SIGMOID, False, ExpertSelection.TOP_K, None, 1.0, False, False),
    "router_bias": (RouterScore.SOFTMAX, True, ExpertSelection.TOP_K, None, 1.0, True, False),
}


def make_moe(style: str, seed: int, top_k: int = K) -> tuple[ModelConfig, MoEWeights]:
    score, renorm, selection, shared_gate, scaling, router_bias, score_bias = STYLES[style]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=F64)           # noqa: E731
    moe = MoEConfig(score=score, selection=selection, n_experts=E, top_k=top_k, d_ff_expert=M, renormalize=renorm,
                    moe_layers=(True,), shared_gate=shared_gate, d_ff_shared=M if shared_gate else None,
                    scaling=scaling, n_group=3 if selection.group_rank_terms else 1,
                    topk_group=2 if selection.group_rank_terms else 1)
    cfg = ModelConfig(family=style, model_type=None, layout=None, n_layers=1, d_model=D, n_heads=1, n_kv_heads=1,
                      head_dim=D, d_ff=M, vocab_size=2, max_positions=None, norm_eps=1e-6, activation="silu",
                      rope=None, sliding_windows=(None,), moe=moe)
    experts = {"w_gate": rnd(E, D, M, s=0.5), "w_up": rnd(E, D, M, s=0.5), "w_out": rnd(E, M, D, s=0.5)}
    shared = None if shared_gate is None else {"w_gate": rnd(D, M, s=0.5), "w_up": rnd(D, M, s=0.5),
                                               "w_out": rnd(M, D, s=0.5)}
    w = MoEWeights(router=rnd(D, E), router_bias=rnd(E) if router_bias else None,
                   score_bias=rnd(E, s=0.3) if score_bias else None, experts=experts, shared=shared,
                   shared_router=rnd(D, 1) if shared_gate is SharedGate.SIGMOID else None)
    return cfg, w


def selection_margin(cfg: ModelConfig, w: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    """Gap between the k-th and (k+1)-th selection score per token (and between the ranks of the last searched and
    the first skipped group, group-limited): ``[T]``; inf when every expert is chosen."""
    logits = x @ w.router + (0 if w.router_bias is None else w.router_bias)
    scores = logits.softmax(-1) if cfg.moe.score is RouterScore.SOFTMAX else torch.sigmoid(logits)
    select = scores + (0 if w.score_bias is None else w.score_bias)
    group_gap = torch.full(x.shape[:-1], float("inf"), dtype=F64)
    terms = cfg.moe.selection.group_rank_terms          # a group's rank: its best two (V3) or its best (V2)
    if terms:
        grouped = select.reshape(*x.shape[:-1], cfg.moe.n_group, -1)
        rank = grouped.topk(2, dim=-1).values.sum(-1) if terms == 2 else grouped.amax(dim=-1)
        ranked = rank.sort(dim=-1, descending=True)
        group_gap = ranked.values[..., cfg.moe.topk_group - 1] - ranked.values[..., cfg.moe.topk_group]
        kept = torch.zeros_like(rank, dtype=torch.bool).scatter(-1, ranked.indices[..., :cfg.moe.topk_group], True)
        select = select.masked_fill(~kept.repeat_interleave(grouped.shape[-1], dim=-1), float("-inf"))
    if cfg.moe.top_k == select.shape[-1]:
        return group_gap
    top = select.topk(cfg.moe.top_k + 1, dim=-1).values
    return torch.minimum(top[..., -2] - top[..., -1], group_gap)


def token_jacobian(cfg: ModelConfig, w: MoEWeights, x: torch.Tensor) -> torch.Tensor:
    """Exact Jacobian ``[d, d]`` of the MoE at one token ``x [d]`` (autograd; the selection is constant around it)."""
    return torch.autograd.functional.jacobian(lambda v: run_moe(v[None, None], w, cfg)[0][0, 0], x)


def points(cfg: ModelConfig, w: MoEWeights, n: int, scale: float, seed: int) -> torch.Tensor:
    """``n`` random tokens of norm about ``scale`` whose routing is at least 1e-3 (selection score) from a switch."""
    x = scale * torch.randn(4 * n, D, generator=torch.Generator().manual_seed(seed), dtype=F64) / D ** 0.5
    keep = selection_margin(cfg, w, x) > 1e-3
    assert int(keep.sum()) >= n
    return x[keep][:n]


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("seed", range(4))
def test_t37_local_bound_covers_the_jacobian_with_routing_fixed(style: str, seed: int) -> None:
    cfg, w = make_moe(style, seed)
    for scale in (0.5, 2.0, 6.0):
        x = points(cfg, w, 12, scale, seed)
        route = route_tokens(x[None], w, cfg)
        bound = compute_moe_local_tokens(x, w, cfg.moe, route, 0, "silu")                 # [T]
        for t in range(x.shape[0]):
            lower = float(torch.linalg.matrix_norm(token_jacobian(cfg, w, x[t]), ord=2))   # exact ||J(x)||_2
            assert lower <= bound[t] * (1 + 1e-9), (style, scale, t, lower, float(bound[t]))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_t37_ball_bound_covers_every_jacobian_in_the_ball(style: str) -> None:
    """Tier 1 inside a routing region: ``||J(x)||`` at points of the ball (also on its sphere) never exceeds it."""
    cfg, w = make_moe(style, 7)
    for radius in (1.0, 4.0):
        ball = compute_moe_ball(radius, w, cfg.moe, "silu")
        x = points(cfg, w, 20, radius * D ** 0.5, 11)
        x = x / x.norm(dim=-1, keepdim=True) * radius * torch.rand(x.shape[0], 1, dtype=F64,
                                                                     generator=torch.Generator().manual_seed(2)) ** 0.2
        route = route_tokens(x[None], w, cfg)
        local = compute_moe_local_tokens(x, w, cfg.moe, route, 0, "silu")
        assert float(local.max()) <= ball * (1 + 1e-12)                               # ordering tier 2 <= tier 1
        for t in range(x.shape[0]):
            lower = float(torch.linalg.matrix_norm(token_jacobian(cfg, w, x[t]), ord=2))
            assert lower <= ball


def test_expert_ball_magnitude_bounds_every_output() -> None:
    """``M_e`` (the ball's bound on ``||E_e(x)||``) holds at random points of the ball and on its sphere."""
    cfg, w = make_moe("mixtral", 3)
    lips, mags = compute_expert_balls(2.0, w, "silu")
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = 2.0 * x / x.norm(dim=-1, keepdim=True)
    for e in range(E):
        ex = w.expert(e)
        out = (torch.nn.functional.silu(x @ ex["w_gate"]) * (x @ ex["w_up"])) @ ex["w_out"]
        assert float(out.norm(dim=-1).max()) <= mags[e]
        assert lips[e] > 0


@pytest.mark.parametrize("style", sorted(STYLES))
def test_gate_jacobian_matches_autograd(style: str) -> None:
    """``dg/dl`` over the logits the gates read, as the bounds form it, equals autograd's."""
    cfg, w = make_moe(style, 1)
    x = points(cfg, w, 6, 2.0, 4)
    route = route_tokens(x[None], w, cfg)
    jac = compute_gate_jacobian(cfg.moe, route, 0)                                       # [T, k, n]
    for t in range(x.shape[0]):
        sel = route.selected[0, t]
        logits = (x[t] @ w.router + (0 if w.router_bias is None else w.router_bias)).detach()

        def gates(v: torch.Tensor) -> torch.Tensor:
            full = logits.clone()
            if jac.shape[-1] == cfg.moe.top_k:
                full = full.index_put((sel,), v)
            else:
                full = v
            sc = full.softmax(-1) if cfg.moe.score is RouterScore.SOFTMAX else torch.sigmoid(full)
            g = sc[sel]
            return cfg.moe.scaling * (g / g.sum() if cfg.moe.renormalize else g)
        start = logits[sel] if jac.shape[-1] == cfg.moe.top_k else logits
        want = torch.autograd.functional.jacobian(gates, start)
        torch.testing.assert_close(jac[t], want, rtol=1e-12, atol=1e-14)


def _enumerated_inf_to_one(a: torch.Tensor) -> float:
    n = a.shape[-1]
    return max(float((a @ torch.tensor(v, dtype=F64)).abs().sum()) for v in itertools.product((-1.0, 1.0), repeat=n))


@pytest.mark.parametrize("top_k", [2, 3, 4, 6])
@pytest.mark.parametrize("style", ["mixtral", "router_bias"])
def test_t38_renormalized_softmax_gate_theta_is_the_inf_to_one_norm(style: str, top_k: int) -> None:
    """T38: for gates renormalized over the selected experts, ``||dg/dl||_{inf->1} = theta(g)`` (Thm 4.2); the
    reported G (``gate_theta``) equals vertex enumeration of the autograd Jacobian and brute-force theta."""
    cfg, w = make_moe(style, top_k, top_k=top_k)
    x = points(cfg, w, 10, 3.0, 8)
    route = route_tokens(x[None], w, cfg)
    got = compute_gate_theta(cfg.moe, route, 0)
    for t in range(x.shape[0]):
        sel = route.selected[0, t]
        logits = (x[t] @ w.router + (0 if w.router_bias is None else w.router_bias)).detach()
        jac = torch.autograd.functional.jacobian(lambda v: (lambda g: g / g.sum())(v.softmax(-1)), logits[sel])
        enumerated = _enumerated_inf_to_one(jac)
        gates = route.gates[0, t]
        assert abs(enumerated - float(theta_exact(gates))) <= 1e-14
        assert abs(float(got[t]) - enumerated) <= 1e-6 + 1e-14      # the reported theta_hi carries THETA_SLACK
        assert float(got[t]) >= enumerated


def test_unrenormalized_softmax_gate_bound_covers_enumeration() -> None:
    """Qwen2-MoE's gates (k rows of diag(p) - p p^T over all E logits): theta(p) bounds their inf->1 norm."""
    cfg, w = make_moe("qwen2_moe", 2)
    x = points(cfg, w, 10, 3.0, 9)
    route = route_tokens(x[None], w, cfg)
    jac = compute_gate_jacobian(cfg.moe, route, 0)
    got = compute_gate_theta(cfg.moe, route, 0)
    for t in range(x.shape[0]):
        assert _enumerated_inf_to_one(jac[t]) <= float(got[t])

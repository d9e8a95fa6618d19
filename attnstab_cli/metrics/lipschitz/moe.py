"""Lipschitz bounds of a mixture-of-experts FFN inside a routing region (THEORY §18.7).

With the selection ``E(x)`` fixed, ``MoE(x) = sum_e g_e(x) E_e(x) + sum_s omega_s(x) S_s(x)`` and

    ||J(x)|| <= sum_e g_e L_e(x) + G(x) ||W_r||_{2->inf} D(x) + sum_s (omega_s L_S(x) + |omega_s'| ||w_s|| ||S(x)||)

(routing is piecewise constant, so this bounds ``||J||`` wherever it exists; across a switch the map jumps).
``L_e`` is the gated-FFN bound of §6.2 per expert, ``G = ||dg/dl||_{inf->1}`` over the logits the gates read,
``||W_r||_{2->inf}`` the largest router column norm over those logits (``|dl_j| <= ||W_r[:, j]|| ||dx||``), and
``D`` the spread of the expert outputs: when the gates sum to a constant (renormalized), ``sum_e dg_e = 0`` and
``||sum_e E_e dg_e|| <= ||dg||_1 diam{E_e} / 2`` (split ``dg`` into its positive and negative parts, each of mass
``||dg||_1 / 2``: their difference is a difference of two convex combinations of the ``E_e``), so
``D = diam / 2``; otherwise ``D = max_e ||E_e||``.

The experts' unit is §6.2's gated FFN or gpt-oss's clamped SwiGLU (:mod:`.clamped_swiglu`, with the experts'
biases); shared experts are always §6.2's.

``G``: renormalized softmax gates are the softmax of the selected logits, ``G = theta(g_hat)`` (Thm 4.2, times the
scaling factor); unrenormalized softmax gates are k rows of ``diag(p) - p p^T`` over all E logits, so
``G <= theta(p)`` of the full router distribution; sigmoid gates are enumerated over the ``2^k`` vertices.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch

from attnstab_cli.arch.spec import ExpertGLU, RouterScore, SharedGate
from attnstab_cli.metrics.lipschitz.clamped_swiglu import compute_clamped_ball, compute_clamped_local_tokens
from attnstab_cli.metrics.lipschitz.ffn import GATED, compute_swiglu_ball, compute_swiglu_local_tokens
from attnstab_cli.metrics.spectral import norm_2_to_inf, spectral_norm_value
from attnstab_cli.metrics.theta import compute_theta_interval
from attnstab_cli.model.config import MoEConfig
from attnstab_cli.model.experts import GLUForm, compute_expert_output, expert_form
from attnstab_cli.model.traces import MoETrace
from attnstab_cli.model.weights import MoEWeights

F64 = torch.float64


@dataclass(frozen=True)
class MoENorms:
    """Weight norms of one MoE layer: per expert ``[E]`` (spectral norms of W_g, W_u, W_d), the router's column
    norms ``[E]`` and the shared experts' norms."""

    gate: torch.Tensor
    up: torch.Tensor
    out: torch.Tensor
    router_columns: torch.Tensor
    shared: dict[str, float] | None = None
    shared_router: float | None = None

    def expert(self, e: int) -> dict[str, float]:
        return {"w_gate": float(self.gate[e]), "w_up": float(self.up[e]), "w_out": float(self.out[e])}


def compute_moe_norms(w: MoEWeights) -> MoENorms:
    """The norms the bounds of one MoE layer read; they depend on the weights alone (once per layer)."""
    ex = w.experts
    shared = None if w.shared is None else {k: float(spectral_norm_value(v)) for k, v in w.shared.items()}
    return MoENorms(gate=spectral_norm_value(ex["w_gate"]).to(F64).cpu(), up=spectral_norm_value(ex["w_up"]).to(F64).cpu(),
                    out=spectral_norm_value(ex["w_out"]).to(F64).cpu(),
                    router_columns=torch.linalg.vector_norm(w.router.to(F64), dim=0).cpu(), shared=shared,
                    shared_router=None if w.shared_router is None else float(w.shared_router.to(F64).norm()))


def _inf_to_one(jac: torch.Tensor) -> torch.Tensor:
    """``max_{v in {-1, 1}^n} ||A v||_1`` of ``jac [T, k, n]`` by vertex enumeration (n <= 16): ``[T]``."""
    n = jac.shape[-1]
    if n > 16:
        raise ValueError(f"vertex enumeration over {n} logits")
    signs = torch.tensor(list(product((-1.0, 1.0), repeat=n)), dtype=jac.dtype)        # [2^n, n]
    return (jac @ signs.T).abs().sum(dim=-2).amax(dim=-1)


def compute_gate_jacobian(moe: MoEConfig, route: MoETrace, b: int) -> torch.Tensor:
    """``dg/dl`` of sequence ``b``'s tokens over the logits the gates read: ``[T, k, k]`` over the selected logits
    (renormalized softmax, sigmoid) or ``[T, k, E]`` over all (unrenormalized softmax)."""
    sel, scores = route.selected[b].cpu(), route.scores[b].to(F64).cpu()               # [T, k], [T, E]
    s = moe.scaling
    if moe.score is RouterScore.SOFTMAX:
        if moe.renormalize:
            g = scores.gather(-1, sel)
            g = g / g.sum(dim=-1, keepdim=True)                                         # [T, k]
            return s * (torch.diag_embed(g) - g[..., :, None] * g[..., None, :])
        p_sel = scores.gather(-1, sel)                                                  # [T, k]
        eye = torch.nn.functional.one_hot(sel, scores.shape[-1]).to(F64)                # [T, k, E]
        return s * p_sel[..., None] * (eye - scores[:, None, :])
    sig = scores.gather(-1, sel)                                                        # [T, k]
    dsig = sig * (1.0 - sig)
    if not moe.renormalize:
        return s * torch.diag_embed(dsig)
    total = sig.sum(dim=-1, keepdim=True)                                               # [T, 1]
    return s * (torch.diag_embed(dsig / total) - (sig / total.pow(2))[..., :, None] * dsig[..., None, :])


def compute_gate_theta(moe: MoEConfig, route: MoETrace, b: int) -> torch.Tensor:
    """``G(x) = ||dg/dl||_{inf->1}`` per token of sequence ``b`` (``[T]``): theta of the renormalized gates, theta_hi
    of the full router distribution for unrenormalized softmax gates, enumeration for sigmoid gates."""
    scores = route.scores[b].to(F64).cpu()
    if moe.score is RouterScore.SOFTMAX:
        if moe.renormalize:
            g = scores.gather(-1, route.selected[b].cpu())
            return moe.scaling * compute_theta_interval(g / g.sum(dim=-1, keepdim=True)).hi
        return moe.scaling * compute_theta_interval(scores).hi
    return _inf_to_one(compute_gate_jacobian(moe, route, b))


def _expert_outputs(x: torch.Tensor, w: MoEWeights, sel: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``E_e(x_t)`` of every token's selected experts: ``[T, k, d]``."""
    ex = {k: v.to(F64).cpu()[sel] for k, v in w.experts.items()}                      # [T, k, ...]
    ex = {k: v[:, :, None, :] if k.startswith("b_") else v for k, v in ex.items()}      # biases [T, k, 1, *]
    xt = x.to(F64).cpu()[:, None, None, :]                                              # [T, 1, 1, d]
    return compute_expert_output(xt, ex, form)[:, :, 0, :]


def _expert_local(x: torch.Tensor, ex: dict[str, torch.Tensor], norms: dict[str, float],
                  form: GLUForm) -> torch.Tensor:
    """One expert's tier-2 bound at its tokens ``x [n, d]``: §6.2's local form, or the clamped SwiGLU's."""
    if form.kind is ExpertGLU.CLAMPED_SWIGLU:
        return compute_clamped_local_tokens(x, ex, norms, form)
    return compute_swiglu_local_tokens(x, ex["w_gate"], ex["w_up"], ex["w_out"], norms, form.activation)


def compute_moe_local_tokens(x: torch.Tensor, w: MoEWeights, moe: MoEConfig, route: MoETrace, b: int,
                             activation: str, norms: MoENorms | None = None) -> torch.Tensor:
    """Tier 2 per token of sequence ``b`` (FFN inputs ``x [T, d]``, the routing of that sequence): ``[T]``."""
    norms = norms or compute_moe_norms(w)
    form = expert_form(moe, activation)
    x = x.to(F64).cpu()
    sel, gates = route.selected[b].cpu(), route.gates[b].to(F64).cpu()                 # [T, k]
    local = torch.zeros_like(gates)
    for e in torch.unique(sel).tolist():
        rows = (sel == e)                                                               # [T, k]
        tokens = rows.any(dim=-1)
        ex = {k: v.to(F64).cpu() for k, v in w.expert(e).items()}
        value = _expert_local(x[tokens], ex, norms.expert(e), form)                     # [n_e]
        full = torch.zeros(x.shape[0], dtype=F64)
        full[tokens] = value
        local = torch.where(rows, full[:, None], local)
    expert_term = (gates * local).sum(dim=-1)                                           # [T]
    outs = _expert_outputs(x, w, sel, form)                                             # [T, k, d]
    if moe.gates_sum_to_one:
        spread = 0.5 * torch.cdist(outs, outs).flatten(1).amax(dim=-1)                 # diam / 2
        columns = norms.router_columns[sel].amax(dim=-1)                                # the selected logits
    else:
        spread = torch.linalg.vector_norm(outs, dim=-1).amax(dim=-1)
        columns = norms.router_columns.amax().expand(x.shape[0]) if moe.score is RouterScore.SOFTMAX else \
            norms.router_columns[sel].amax(dim=-1)
    bound = expert_term + compute_gate_theta(moe, route, b) * columns * spread
    if w.shared is not None:
        bound = bound + _shared_local(x, w, moe, route, b, activation, norms)
    return bound


def _shared_local(x: torch.Tensor, w: MoEWeights, moe: MoEConfig, route: MoETrace, b: int, activation: str,
                  norms: MoENorms) -> torch.Tensor:
    """``omega L_S(x) + |omega'| ||w_s|| ||S(x)||`` per token (``omega = 1``, ``omega' = 0`` for a constant gate)."""
    sh = {k: v.to(F64).cpu() for k, v in w.shared.items()}
    lip = compute_swiglu_local_tokens(x, sh["w_gate"], sh["w_up"], sh["w_out"], norms.shared, activation)
    if moe.shared_gate is not SharedGate.SIGMOID:
        return lip
    phi = GATED[activation][0]
    out = torch.linalg.vector_norm((phi(x @ sh["w_gate"]) * (x @ sh["w_up"])) @ sh["w_out"], dim=-1)
    omega = torch.sigmoid(x @ w.shared_router.to(F64).cpu())[:, 0]
    return omega * lip + omega * (1.0 - omega) * norms.shared_router * out


def _ball(r2: float, ffn: dict[str, torch.Tensor], norms: dict[str, float], form: GLUForm) -> tuple[float, float]:
    """``(L, M)`` of an expert on ``||x|| <= r2``: the clamped SwiGLU's (:mod:`.clamped_swiglu`), or for §6.2's
    gated FFN its ball bound and ``sup ||f(x)|| <= ||W_d|| phi(A) ||W_u|| r2`` (``|phi(a_k)| <= phi(A)``,
    ``||x W_u|| <= ||W_u|| r2``)."""
    if form.kind is ExpertGLU.CLAMPED_SWIGLU:
        return compute_clamped_ball(r2, ffn, norms, form)
    phi = GATED[form.activation][0]
    lip = compute_swiglu_ball(r2, ffn["w_gate"], ffn["w_up"], ffn["w_out"], activation=form.activation)
    big_a = r2 * float(norm_2_to_inf(ffn["w_gate"]))
    return lip, norms["w_out"] * float(phi(torch.tensor(big_a, dtype=F64))) * norms["w_up"] * r2


def compute_expert_balls(r2: float, w: MoEWeights, activation: str, norms: MoENorms | None = None,
                         moe: MoEConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert ``(L_e, M_e)`` on the ball ``||x|| <= r2``: ``[E]`` each (the experts table's ``lip_weights``);
    the experts' unit per ``moe`` (§6.2's gated FFN without it)."""
    norms = norms or compute_moe_norms(w)
    form = expert_form(moe, activation)
    pairs = [_ball(r2, w.expert(e), norms.expert(e), form) for e in range(w.router.shape[1])]
    return torch.tensor([p[0] for p in pairs], dtype=F64), torch.tensor([p[1] for p in pairs], dtype=F64)


def compute_moe_ball(r2: float, w: MoEWeights, moe: MoEConfig, activation: str,
                     norms: MoENorms | None = None) -> float:
    """Tier 1 inside a routing region on ``||x|| <= r2``: gates of total at most ``scaling`` (softmax scores,
    renormalized gates) or ``k scaling`` (sigmoid scores), ``G <= scaling`` for softmax gates (theta <= 1),
    ``2 scaling`` for renormalized and ``k scaling / 4`` for plain sigmoid gates, any router column, ``D <= max M_e``;
    a sigmoid shared gate adds ``L_S + ||w_s|| M_S / 4``."""
    norms = norms or compute_moe_norms(w)
    lips, mags = compute_expert_balls(r2, w, activation, norms, moe)
    k, s = moe.top_k, moe.scaling
    if moe.score is RouterScore.SOFTMAX or moe.renormalize:
        experts = s * float(lips.max())
    else:
        experts = s * float(lips.topk(k).values.sum())
    gate = s if moe.score is RouterScore.SOFTMAX else (2.0 * s if moe.renormalize else k * s / 4.0)
    bound = experts + gate * float(norms.router_columns.max()) * float(mags.max())
    if w.shared is not None:
        lip, mag = _ball(r2, w.shared, norms.shared, GLUForm(ExpertGLU.GATED, activation))
        bound += lip + (0.25 * norms.shared_router * mag if moe.shared_gate is SharedGate.SIGMOID else 0.0)
    return bound

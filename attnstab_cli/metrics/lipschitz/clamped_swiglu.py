"""Lipschitz and magnitude bounds of gpt-oss's clamped SwiGLU expert (THEORY §6.2, §18.7).

The expert is ``y = h(a, b) W_d + b_d`` with ``a = x W_g + b_g``, ``b = x W_u + b_u`` and, per coordinate,

    h(a, b) = psi(a') (b' + 1),   a' = min(a, L),   b' = clip(b, -L, L),   psi(z) = z sigmoid(alpha z).

* ``psi(z) = silu(alpha z) / alpha``, so ``psi'(z) = silu'(alpha z)``: the extrema of ``psi'`` are those of silu',
  ``max 1.0998393`` at ``z*/alpha`` and ``min -0.0998393`` at ``-z*/alpha`` (``z* = 2.399357``), and
  ``min psi = -0.2784645 / alpha`` at ``-1.2784645 / alpha`` (silu's minimum: there ``1 + z (1 - sigma(z)) = 0``, so
  ``silu(z) = z + 1``).
* The clamps are 1-Lipschitz: ``da'/da = 1[a <= L]``, ``db'/db = 1[|b| <= L]`` (at a kink the larger one-sided
  slope, so the local constants cover both sides), and they cap ``a' <= L``, ``|b'| <= L``.
* Local (tier 2): ``||J(x)|| <= ||W_d|| (||W_g|| max_k |psi'(a'_k) 1[a_k <= L] (b'_k + 1)|
  + ||W_u|| max_k |psi(a'_k) 1[|b_k| <= L]|)``.
* Ball ``||x|| <= R`` (tier 1): ``|a_k| <= A_k = R ||W_g[:, k]|| + |b_{g,k}|``, ``|b_k| <= B_k`` likewise. On it
  ``sup |psi'(a')| = silu'(min(alpha min(A, L), z*))`` (the negative side's ``|silu'| <= 0.0998 < 1/2 <=
  silu'(t >= 0)``), ``sup |psi(a')| = max(psi(min(A, L)), Aσ(-alpha A) if alpha A <= 1.2784645 else
  0.2784645 / alpha)``, ``sup |b' + 1| = min(B, L) + 1`` (the +1 enters as B + 1), so
  ``L_E = ||W_d|| (||W_g|| max_k S_g(A_k) U(B_k) + ||W_u|| max_k G(A_k))`` and
  ``||E(x)|| <= ||W_d|| min(||G(A) U(B)||_2, max_k G(A_k) (||W_u|| R + ||b_u|| + sqrt m)) + ||b_d||``.
"""
from __future__ import annotations

import math

import torch

from attnstab_cli.metrics.lipschitz.ffn import SILU_ZSTAR, silu_derivative
from attnstab_cli.model.experts import GLUForm, preactivations

F64 = torch.float64
SILU_ZMIN = 1.2784645427610738     # silu is smallest at -SILU_ZMIN (ternary search, float64)
SILU_NEG_MAX = 0.2784645427610738  # -min silu = SILU_ZMIN - 1 (``silu(z) = z + 1`` at its minimum)
_NEG_MAX_UP = 0.27846455           # rounded up, for the bounds


def gate_slope(a: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``d psi(min(a, L)) / da`` with the larger one-sided slope at the kink ``a = L``."""
    return silu_derivative(form.alpha * a.clamp(max=form.limit)) * (a <= form.limit).to(a.dtype)


def up_slope(b: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``d (clip(b, -L, L) + 1) / db`` with slope 1 at the kinks ``|b| = L``."""
    return (b.abs() <= form.limit).to(b.dtype)


def compute_clamped_local_tokens(x: torch.Tensor, ex: dict[str, torch.Tensor], norms: dict[str, float],
                                 form: GLUForm) -> torch.Tensor:
    """Tier 2 per token at the expert inputs ``x [T, d]`` (float64): ``[T]``; ``norms`` the spectral norms of
    ``w_gate``, ``w_up``, ``w_out``."""
    a, b = preactivations(x.to(F64), {k: v.to(F64) for k, v in ex.items()})          # [T, m] each
    gate_term = norms["w_gate"] * (gate_slope(a, form) * form.up(b)).abs().amax(dim=-1)
    up_term = norms["w_up"] * (form.gate(a) * up_slope(b, form)).abs().amax(dim=-1)
    return norms["w_out"] * (gate_term + up_term)


def gate_slope_sup(big_a: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``sup_{|a| <= A} |d psi(min(a, L)) / da|`` per entry of ``big_a``."""
    top = torch.clamp(form.alpha * big_a.clamp(max=form.limit), max=SILU_ZSTAR)
    return silu_derivative(top)


def gate_value_sup(big_a: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``sup_{|a| <= A} |psi(min(a, L))|`` per entry of ``big_a``: the positive side at ``min(A, L)``, the negative
    side up to psi's minimum."""
    top = big_a.clamp(max=form.limit)
    positive = top * torch.sigmoid(form.alpha * top)
    negative = torch.where(form.alpha * big_a <= SILU_ZMIN, big_a * torch.sigmoid(-form.alpha * big_a),
                           torch.full_like(big_a, _NEG_MAX_UP / form.alpha))
    return torch.maximum(positive, negative)


def up_value_sup(big_b: torch.Tensor, form: GLUForm) -> torch.Tensor:
    """``sup_{|b| <= B} |clip(b, -L, L) + 1| = min(B, L) + 1`` per entry of ``big_b``."""
    return big_b.clamp(max=form.limit) + 1.0


def compute_clamped_ball(r2: float, ex: dict[str, torch.Tensor], norms: dict[str, float],
                         form: GLUForm) -> tuple[float, float]:
    """``(L, M)`` on the ball ``||x|| <= r2``: the expert's Lipschitz constant and ``sup ||E(x)||``."""
    ex = {k: v.to(F64) for k, v in ex.items()}
    big_a = r2 * torch.linalg.vector_norm(ex["w_gate"], dim=0)                          # [m] bound on |a_k|
    big_b = r2 * torch.linalg.vector_norm(ex["w_up"], dim=0)                            # [m] bound on |b_k|
    if ex.get("b_gate") is not None:
        big_a = big_a + ex["b_gate"].abs()
    if ex.get("b_up") is not None:
        big_b = big_b + ex["b_up"].abs()
    value, up = gate_value_sup(big_a, form), up_value_sup(big_b, form)                   # [m] each
    lip = norms["w_out"] * (norms["w_gate"] * float((gate_slope_sup(big_a, form) * up).max())
                            + norms["w_up"] * float(value.max()))
    b_up_norm = 0.0 if ex.get("b_up") is None else float(ex["b_up"].norm())
    hidden = min(float(torch.linalg.vector_norm(value * up)),
                 float(value.max()) * (norms["w_up"] * r2 + b_up_norm + math.sqrt(big_b.shape[0])))
    b_out = 0.0 if ex.get("b_out") is None else float(ex["b_out"].norm())
    return lip, norms["w_out"] * hidden + b_out

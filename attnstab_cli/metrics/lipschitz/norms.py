"""Lipschitz constants, magnitude-reset radii and closed-form Jacobians of LayerNorm and RMSNorm (THEORY §4).

Both norms act tokenwise, so their block-(inf,2) induced norm is the largest per-token spectral norm (§1.1):

* local (§4.1 Lemma A.1, §4.2): ``||J(x)||_2 <= ||gamma||_inf / sqrt(v + eps)`` with ``v`` the biased variance (LN) or
  mean square (RMSNorm) of ``x``; equality for ``gamma = 1`` (LN needs ``d >= 3``). On a sequence the constant uses
  ``v_min``;
* global: ``||gamma||_inf / sqrt(eps)`` (valid, vacuous; Errata E3);
* reset (Lemma 3.3): ``||LN(x)||_2 <= ||gamma||_inf sqrt(d) + ||beta||_2`` and ``||RMS(x)||_2 <= ||gamma||_inf sqrt(d)``.

Jacobians use the column convention ``J[a, b] = d y_a / d x_b`` (what ``torch.autograd.functional.jacobian`` returns).
"""
from __future__ import annotations

import math

import torch

from attnstab_cli.arch.spec import NormKind
from attnstab_cli.model.weights import NormWeights


def compute_norm_statistic(x: torch.Tensor, kind: NormKind) -> torch.Tensor:
    """Per-token biased variance (LN) or mean square (RMSNorm) of ``x [..., d]`` in float64: ``[...]``."""
    x64 = x.to(torch.float64)
    if kind is NormKind.LAYERNORM:
        return x64.var(dim=-1, unbiased=False)
    return x64.pow(2).mean(dim=-1)


def _gamma_inf(gamma: torch.Tensor) -> float:
    return float(gamma.to(torch.float64).abs().max())


def compute_norm_lip_global(gamma: torch.Tensor, eps: float) -> float:
    """Global constant ``||gamma||_inf / sqrt(eps)`` (§4.1, §4.2); attained at ``x = 0`` for RMSNorm."""
    return _gamma_inf(gamma) / math.sqrt(eps)


def compute_norm_lip_tokens(gamma: torch.Tensor, stat: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token local bound ``||gamma||_inf / sqrt(v_t + eps)`` for ``stat [...]`` (variance or mean square)."""
    return _gamma_inf(gamma) / torch.sqrt(stat.to(torch.float64).clamp_min(0.0) + eps)


def compute_norm_lip_local(gamma: torch.Tensor, stat: torch.Tensor, eps: float) -> float:
    """Sequence constant ``||gamma||_inf / sqrt(v_min + eps)`` (columns ``lnK_lip_local``, §4)."""
    v_min = float(stat.to(torch.float64).clamp_min(0.0).min())
    return _gamma_inf(gamma) / math.sqrt(v_min + eps)


def norm_lip_global(norm: NormWeights, eps: float) -> float:
    """:func:`compute_norm_lip_global` of a norm layer; 1 for the identity (a layer without that norm)."""
    return 1.0 if norm.identity else compute_norm_lip_global(norm.weight, eps)


def norm_lip_local(norm: NormWeights, stat: torch.Tensor | None, eps: float) -> float:
    """:func:`compute_norm_lip_local` of a norm layer at its inputs' statistics ``stat``; 1 for the identity."""
    return 1.0 if norm.identity else compute_norm_lip_local(norm.weight, stat, eps)


def compute_reset_radius(norm: NormWeights, kind: NormKind) -> float:
    """Bound on ``||N(x)||_2`` for every ``x`` (Lemma 3.3, §4.2): ``||gamma||_inf sqrt(d) (+ ||beta||_2 for LN)``."""
    d = norm.weight.shape[-1]
    radius = _gamma_inf(norm.weight) * math.sqrt(d)
    if kind is NormKind.LAYERNORM and norm.bias is not None:
        radius += float(torch.linalg.vector_norm(norm.bias.to(torch.float64)))
    return radius


def compute_embedding_radius(tok: torch.Tensor, pos: torch.Tensor | None = None,
                             types: torch.Tensor | None = None, tok_scale: float = 1.0) -> float:
    """Radius of ``h_0`` without an embedding norm (§8.1): ``max ||E_tok|| + max ||E_pos|| + max ||E_type||``, the
    token rows times the model's embedding scale (§18.6)."""
    total = 0.0
    for table, factor in ((tok, tok_scale), (pos, 1.0), (types, 1.0)):      # each [rows, d]
        if table is not None:
            total += factor * float(torch.linalg.vector_norm(table.to(torch.float64), dim=-1).max())
    return total


def layernorm_jacobian(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``J_LN(x) = diag(gamma) (P - z z^T / d) / sqrt(sigma^2 + eps)`` for one token ``x [d]`` (§4.1): ``[d, d]``."""
    x64, g = x.to(torch.float64), gamma.to(torch.float64)
    d = x64.shape[-1]
    r = torch.sqrt(x64.var(unbiased=False) + eps)
    z = (x64 - x64.mean()) / r                                               # [d]
    centre = torch.eye(d, dtype=torch.float64) - 1.0 / d                     # P = I - 11^T / d
    return g[:, None] * (centre - torch.outer(z, z) / d) / r


def rmsnorm_jacobian(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``J(x) = diag(gamma) (I - n n^T / d) / r``, ``r = sqrt(ms + eps)``, for one token ``x [d]`` (§4.2): ``[d, d]``."""
    x64, g = x.to(torch.float64), gamma.to(torch.float64)
    d = x64.shape[-1]
    r = torch.sqrt(x64.pow(2).mean() + eps)
    n = x64 / r                                                              # [d]
    return g[:, None] * (torch.eye(d, dtype=torch.float64) - torch.outer(n, n) / d) / r


def norm_jacobian(x: torch.Tensor, gamma: torch.Tensor, eps: float, kind: NormKind) -> torch.Tensor:
    """Closed-form per-token Jacobian of either norm: ``[d, d]``."""
    if kind is NormKind.LAYERNORM:
        return layernorm_jacobian(x, gamma, eps)
    return rmsnorm_jacobian(x, gamma, eps)

"""Closed-form second derivatives of LayerNorm and RMSNorm (README "Second derivatives of the norm layers").

Both maps share one formula (derived in this project; THEORY §4 gives the first derivatives):

* LayerNorm: ``y = gamma * a + beta``, ``a = z = (x - mean(x)) / s``, ``s = sqrt(var(x) + eps)``, ``M = I - 11^T/d``;
* RMSNorm: ``y = gamma * a``, ``a = n = x / s``, ``s = r = sqrt(mean(x^2) + eps)``, ``M = I``.

With ``Q = M - a a^T / d``, ``ds/dx_k = a_k / d`` and ``da_i/dx_k = Q_ik / s``:

* ``J[i, j] = gamma_i Q_ij / s``;
* ``H[i, j, k] = -gamma_i / (d s^2) (a_i Q_jk + a_j Q_ik + a_k Q_ij)``, symmetric in ``(j, k)``;
* ``d^2 y_i / dx_j dgamma_k = delta_ik Q_ij / s``.

``y`` is affine in ``gamma`` at fixed ``x`` (so ``d^2 y / dgamma^2 = 0``) and ``beta`` enters additively with
``dy/dbeta = I`` constant (so every second derivative involving ``beta`` is 0); neither has a function here.

The Jacobians are THEORY §4's, re-used from ``metrics.lipschitz.norms`` (one token ``x [d]``). Every other function
takes one token or a batch ``x [..., d]`` with ``gamma [d]`` and returns float64. They need ``s > 0``: ``eps > 0``,
or ``eps = 0`` with a non-constant (LN) or non-zero (RMSNorm) token. LayerNorm with ``d = 1`` is constant in ``x``
(``M = 0``, ``z = 0``), and every formula then returns exact zeros.
Index convention: ``J[i, j] = dy_i/dx_j`` (as ``torch.autograd.functional.jacobian``), ``H[i, j, k] = d^2y_i/dx_jdx_k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnstab_cli.metrics.lipschitz.norms import layernorm_jacobian, rmsnorm_jacobian

__all__ = [
    "layernorm_jacobian", "rmsnorm_jacobian", "layernorm_input_hessian", "rmsnorm_input_hessian",
    "layernorm_mixed_gamma_hessian", "rmsnorm_mixed_gamma_hessian", "layernorm_hessian_quadratic",
    "rmsnorm_hessian_quadratic", "layernorm_curvature_term", "rmsnorm_curvature_term",
]

F64 = torch.float64


@dataclass(frozen=True)
class _NormState:
    """One norm evaluated at ``x [..., d]``: ``a`` (``z`` or ``n``) ``[..., d]``, ``s`` ``[..., 1]``, ``M`` = P or I."""

    a: torch.Tensor
    s: torch.Tensor
    eps: float
    centred: bool

    @property
    def rank_one(self) -> bool:
        """``M`` has rank 1 (RMSNorm with d = 1, LayerNorm with d = 2): ``Q = (eps / s^2) M`` exactly."""
        return self.a.shape[-1] - int(self.centred) == 1

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``M v`` without forming ``M``: ``[..., d]``."""
        return v - v.mean(dim=-1, keepdim=True) if self.centred else v

    def matrix(self) -> torch.Tensor:
        """``M``: ``[d, d]``."""
        d = self.a.shape[-1]
        return torch.eye(d, dtype=F64) - (1.0 / d if self.centred else 0.0)

    def tangent_apply(self, mv: torch.Tensor) -> torch.Tensor:
        """``Q v`` from ``M v``: ``[..., d]``."""
        if self.rank_one:
            return self.eps / (self.s * self.s) * mv
        return mv - self.a * (self.a * mv).sum(dim=-1, keepdim=True) / self.a.shape[-1]

    def tangent(self) -> torch.Tensor:
        """``Q = M - a a^T / d``, the Jacobian's bracket (``J = diag(gamma) Q / s``): ``[..., d, d]``.

        With rank-1 ``M`` the generic form would compute ``Q``'s only eigenvalue ``eps / s^2`` as ``1 - |a|^2 / d`` and
        lose ``log10(s^2 / eps)`` digits (autograd loses them too), so that case uses ``(eps / s^2) M``.
        """
        if self.rank_one:
            return (self.eps / (self.s * self.s))[..., None] * self.matrix()
        return self.matrix() - self.a[..., :, None] * self.a[..., None, :] / self.a.shape[-1]


def _layernorm_state(x: torch.Tensor, eps: float) -> _NormState:
    x64 = x.to(F64)
    centred = x64 - x64.mean(dim=-1, keepdim=True)                         # [..., d]
    s = torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)        # [..., 1]
    return _NormState(centred / s, s, eps, centred=True)


def _rmsnorm_state(x: torch.Tensor, eps: float) -> _NormState:
    x64 = x.to(F64)
    r = torch.sqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps)            # [..., 1]
    return _NormState(x64 / r, r, eps, centred=False)


def _dense_hessian(st: _NormState, gamma: torch.Tensor) -> torch.Tensor:
    """``-gamma_i / (d s^2) (a_i Q_jk + a_j Q_ik + a_k Q_ij)``: ``[..., d, d, d]``."""
    a, d = st.a, st.a.shape[-1]
    q = st.tangent()                                                        # [..., d, d]
    ai, aj, ak = a[..., :, None, None], a[..., None, :, None], a[..., None, None, :]  # [..., d, 1, 1] etc.
    # Swapping j and k swaps the operands of the inner sum and leaves a_i Q_jk as is: symmetric bit for bit.
    bracket = ai * q[..., None, :, :] + (aj * q[..., :, None, :] + ak * q[..., :, :, None])  # [..., d, d, d]
    scale = gamma.to(F64) / (d * st.s * st.s)                               # [..., d]
    return -scale[..., :, None, None] * bracket


def _quadratic(st: _NormState, gamma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``-gamma / (d s^2) (a u^T Q v + (a.u) Q v + (a.v) Q u)``: ``[..., d]``."""
    a, d = st.a, st.a.shape[-1]
    mu, mv = st.project(u.to(F64)), st.project(v.to(F64))                   # [..., d]
    au = (a * mu).sum(dim=-1, keepdim=True)                                 # [..., 1]  a.u = a.Mu (a = M a)
    av = (a * mv).sum(dim=-1, keepdim=True)                                 # [..., 1]
    qu, qv = st.tangent_apply(mu), st.tangent_apply(mv)                     # [..., d]
    uqv = (mu * qv).sum(dim=-1, keepdim=True)                               # [..., 1]  u^T Q v = (Mu)^T Q v
    return -gamma.to(F64) / (d * st.s * st.s) * (a * uqv + au * qv + av * qu)


def _curvature(st: _NormState, w: torch.Tensor) -> torch.Tensor:
    """``-((w.a) Q + a (Qw)^T + (Qw) a^T) / (d s^2)`` for ``w = gamma * g``: ``[..., d, d]``."""
    a, d = st.a, st.a.shape[-1]
    mw = st.project(w)                                                      # [..., d]
    aw = (a * mw).sum(dim=-1, keepdim=True)                                 # [..., 1]
    outer = a[..., :, None] * st.tangent_apply(mw)[..., None, :]            # [..., d, d]  a_j (Qw)_k
    bracket = aw[..., None] * st.tangent() + (outer + outer.transpose(-1, -2))
    return -bracket / (d * st.s * st.s)[..., None]


def _mixed_gamma(st: _NormState) -> torch.Tensor:
    """``delta_ik Q_ij / s``: ``[..., d, d, d]``."""
    da = st.tangent() / st.s[..., None]                                     # [..., d, d]  da_i/dx_j
    return da[..., :, :, None] * torch.eye(st.a.shape[-1], dtype=F64)[:, None, :]


def layernorm_input_hessian(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``H[..., i, j, k] = d^2 LN(x)_i / dx_j dx_k`` for ``x [..., d]``: ``[..., d, d, d]`` float64."""
    return _dense_hessian(_layernorm_state(x, eps), gamma)


def rmsnorm_input_hessian(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """``H[..., i, j, k] = d^2 RMS(x)_i / dx_j dx_k`` for ``x [..., d]``: ``[..., d, d, d]`` float64."""
    return _dense_hessian(_rmsnorm_state(x, eps), gamma)


def layernorm_mixed_gamma_hessian(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``K[..., i, j, k] = d^2 LN(x)_i / dx_j dgamma_k`` (free of ``gamma``, non-zero only at ``k = i``).

    ``x [..., d]`` -> ``[..., d, d, d]`` float64. Second derivatives in ``gamma`` alone or involving ``beta`` are 0.
    """
    return _mixed_gamma(_layernorm_state(x, eps))


def rmsnorm_mixed_gamma_hessian(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``K[..., i, j, k] = d^2 RMS(x)_i / dx_j dgamma_k`` (free of ``gamma``, non-zero only at ``k = i``).

    ``x [..., d]`` -> ``[..., d, d, d]`` float64. Second derivatives in ``gamma`` alone are 0 (``y`` is linear in it).
    """
    return _mixed_gamma(_rmsnorm_state(x, eps))


def layernorm_hessian_quadratic(x: torch.Tensor, gamma: torch.Tensor, eps: float, u: torch.Tensor,
                                v: torch.Tensor) -> torch.Tensor:
    """``sum_jk H[..., i, j, k] u_j v_k`` of LayerNorm in O(d), never forming ``H``: ``[..., d]`` float64.

    The second-order term of a Hessian-vector product through the layer; ``x, u, v [..., d]`` broadcast.
    """
    return _quadratic(_layernorm_state(x, eps), gamma, u, v)


def rmsnorm_hessian_quadratic(x: torch.Tensor, gamma: torch.Tensor, eps: float, u: torch.Tensor,
                              v: torch.Tensor) -> torch.Tensor:
    """``sum_jk H[..., i, j, k] u_j v_k`` of RMSNorm in O(d), never forming ``H``: ``[..., d]`` float64."""
    return _quadratic(_rmsnorm_state(x, eps), gamma, u, v)


def layernorm_curvature_term(x: torch.Tensor, gamma: torch.Tensor, eps: float, g: torch.Tensor) -> torch.Tensor:
    """``sum_i g_i H[..., i, :, :]``: the Hessian of ``g . LN(x)`` in ``x``, in O(d^2): ``[..., d, d]`` float64.

    With ``g = dl/dy`` this is the part of ``d^2 l / dx^2`` that a Gauss-Newton approximation drops.
    """
    return _curvature(_layernorm_state(x, eps), gamma.to(F64) * g.to(F64))


def rmsnorm_curvature_term(x: torch.Tensor, gamma: torch.Tensor, eps: float, g: torch.Tensor) -> torch.Tensor:
    """``sum_i g_i H[..., i, :, :]``: the Hessian of ``g . RMS(x)`` in ``x``, in O(d^2): ``[..., d, d]`` float64."""
    return _curvature(_rmsnorm_state(x, eps), gamma.to(F64) * g.to(F64))

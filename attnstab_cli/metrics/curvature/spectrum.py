"""Hessian-vector products and the two spectral summaries the curvature scan reports (issue 6, item 1).

* ``hvp``: H v for a block of parameters by forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), the
  other parameters held at their values. One HVP costs about two gradients, and H is never formed.
* ``lanczos_top``: the largest (algebraic) eigenvalue of a symmetric operator by Lanczos with full
  reorthogonalisation. The top Ritz value θ never exceeds λ_max (Cauchy interlacing) and the residual
  ‖Hy − θy‖ = |β_m s_m| is exact in exact arithmetic; the run stops when it is ≤ ``tol`` · |θ| (then an eigenvalue
  lies within that distance of θ), or when the Krylov space is invariant (θ exact), or after ``max_iter`` steps
  (``converged`` false).
* ``hutchinson_trace``: tr H ≈ mean_i z_iᵀ H z_i with Rademacher z_i, and its standard error std/√n.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Params = dict[str, torch.Tensor]
Operator = Callable[[torch.Tensor], torch.Tensor]      # flat vector [n] -> flat vector [n]


def hvp(loss: Callable[[Params], torch.Tensor], params: Params, v: Params) -> Params:
    """H v where H is the Hessian of ``loss`` at ``params`` (only the keys of ``params`` vary)."""
    _, out = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
    return out


def gradient(loss: Callable[[Params], torch.Tensor], params: Params) -> Params:
    return torch.func.grad(loss)(params)


def flat_operator(loss: Callable[[Params], torch.Tensor], params: Params) -> tuple[Operator, int]:
    """H of ``loss`` over ``params`` as an operator on flat vectors (keys in insertion order), and its size n."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def apply(x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, sizes)
        v = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}
        out = hvp(loss, params, v)
        return torch.cat([out[k].reshape(-1) for k in names])

    return apply, sum(sizes)


@dataclass(frozen=True)
class TopEigen:
    value: float            # top Ritz value θ (≤ λ_max)
    residual: float         # ‖H y − θ y‖ for the Ritz vector y (unit)
    iterations: int         # Lanczos steps = Hessian-vector products
    converged: bool


def lanczos_top(op: Operator, n: int, *, max_iter: int = 40, tol: float = 1e-6, seed: int = 0,
                dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> TopEigen:
    """Largest eigenvalue of the symmetric ``op`` on R^n (see the module docstring for the stopping rule)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=dtype).to(device)
    q = q / q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    theta, resid = 0.0, math.inf
    for m in range(1, min(max_iter, n) + 1):
        w = op(basis[-1])
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        stack = torch.stack(basis)                                   # [m, n]
        for _ in range(2):                                           # full reorthogonalisation, twice is enough
            w = w - stack.T @ (stack @ w)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, resid = float(evals[-1]), abs(beta * float(evecs[-1, -1]))
        if beta <= 1e-12 * max(1.0, abs(theta)) or m == n:         # invariant subspace: θ is an exact eigenvalue
            return TopEigen(theta, resid if m < n else 0.0, m, True)
        if resid <= tol * max(abs(theta), 1e-30):
            return TopEigen(theta, resid, m, True)
        basis.append(w / beta)
        betas.append(beta)
    return TopEigen(theta, resid, len(alphas), False)


@dataclass(frozen=True)
class TraceEstimate:
    value: float
    stderr: float
    probes: int


def hutchinson_trace(op: Operator, n: int, *, probes: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> TraceEstimate:
    """tr(op) ≈ mean of zᵀ op(z) over Rademacher probes z (unbiased), with the standard error of that mean."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    samples = []
    for _ in range(probes):
        z = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(device, dtype)
        samples.append(float(z @ op(z)))
    s = torch.tensor(samples, dtype=torch.float64)
    se = float(s.std(unbiased=True) / math.sqrt(probes)) if probes > 1 else math.inf
    return TraceEstimate(float(s.mean()), se, probes)

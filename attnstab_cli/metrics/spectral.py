"""Spectral norms, smallest singular values, condition numbers and 2->inf norms of matrix stacks.

The norms feed upper bounds (THEORY §5.2, §6, §12), so each reported spectral norm comes with a certificate:

* **exact path** (``min(m, n) <= exact_max_dim``, default 4096, below the Gram path's size or wherever the
  tensor's singular values are needed anyway): ``torch.linalg.svdvals`` in float64. The SVD is
  backward stable, so sigma_max carries an absolute error of a few ``eps * sigma_max``; ``value == upper``.
* **Gram path** (``min(m, n) >= GRAM_MIN_DIM`` up to ``exact_max_dim``, when only the norm is asked for and the
  tensor's SVD is not already at hand): ``lambda_max`` of the float64 Gram matrix ``G = W'^T W'`` of the smaller side
  by ``eigvalsh``, a fraction of an SVD's cost. The computed ``G`` is within ``gamma_n ||W||_F^2`` of the true one
  (``n`` the long side), and ``eigvalsh`` is backward stable (``4 r eps ||G||_2``), so by Weyl
  ``|lambda - sigma_max^2| <= E`` with ``E`` the sum of both; ``upper = sqrt(lambda + E)`` and
  ``value = sqrt(max(lambda - E, 0))`` bracket sigma_max, about ``n r eps`` apart (relative).
* **power path** (larger matrices): batched power iteration on ``W^T W`` gives a lower bound
  ``sigma_lo = ||W v|| / ||v|| <= sigma_max`` (float64). The upper bound uses the Gram matrix ``G`` of the smaller
  side and ``sigma_max^(2k) = lambda_max(G^k) <= ||G^k||_F <= sqrt(r) sigma_max^(2k)``, so
  ``sigma_hi = ||G^k||_F^(1/(2k))`` is at most ``r^(1/(4k))`` above the truth. ``G^k`` is formed by repeated
  squaring with ``k = 2^j`` (normalised each step, log-scale tracked), which also accelerates the lower bound
  (``v = G^k x``). Squaring stops once ``sigma_hi <= (1 + rtol) sigma_lo``; then the reported ``value = sigma_lo``
  satisfies ``(1 - rtol) sigma_max <= sigma_hi / (1 + rtol) <= value <= sigma_max``. Float64 rounding of the squarings
  (relative error ~ ``r^2 eps`` on the top eigenvalue per step, halved by each root) is covered by a safety margin
  ``1 + 2 (m + r) r eps`` applied to ``sigma_hi``.

``kappa`` (THEORY §13, §14) needs the smallest singular value, which has no cheap certified iterative path. Per-head
slices take one float64 SVD; a whole matrix whose smaller side is at least ``GRAM_MIN_DIM``
(:func:`extreme_singular_values`) takes the Gram path's ``eigvalsh`` instead, whose smallest eigenvalue is bracketed
by the same Weyl bound ``E`` as the largest: it is used when that bracket pins sigma_min to ``rtol`` (relative), and
the SVD otherwise (a nearly rank-deficient matrix).

``||W||_{2->inf}`` (THEORY §6.2) is the largest column l2 norm, because
``||x W||_inf = max_k |x . W[:, k]| <= ||x||_2 max_k ||W[:, k]||_2`` in the row convention.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from attnstab_cli.metrics.threads import single_threaded

EXACT_MAX_DIM = 4096
GRAM_MIN_DIM = 128         # below this an SVD costs little and the exact path is kept


@dataclass(frozen=True)
class SpectralNorm:
    """Spectral norms of a stack ``[...]`` (float64, on the input's device).

    ``value`` never exceeds sigma_max (up to float64 rounding) and, where ``certified``, is at most ``rtol`` (relative)
    below it; ``upper`` is always a rigorous upper bound. On the exact path ``value == upper``.
    """

    value: torch.Tensor        # [...] float64
    upper: torch.Tensor        # [...] float64
    certified: torch.Tensor    # [...] bool
    method: str                # "svd" | "gram" | "power"
    iterations: int = 0        # power-iteration steps
    squarings: int = 0         # Gram squarings used by the certificate


def _as_stack(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flatten ``[..., m, n]`` to ``[N, m, n]`` float64; returns the batch shape to restore."""
    if w.dim() < 2:
        raise ValueError(f"expected a matrix stack [..., m, n], got shape {list(w.shape)}")
    batch = tuple(w.shape[:-2])
    return w.reshape(-1, *w.shape[-2:]).to(torch.float64), batch


_SHARED: ContextVar[dict[tuple, tuple[torch.Tensor, Any]] | None] = ContextVar("attnstab_shared_spectra",
                                                                               default=None)


@contextmanager
def shared_spectra() -> Iterator[None]:
    """Within the block, each weight tensor's SVD and spectral norm are computed once and shared by every caller.

    One layer's metrics ask for the same norms several times (weight columns, head norms, tier 1, the per-token FFN
    bound); the scan wraps each trace's metrics in this block. Entries are keyed by the tensor object and its version
    counter and keep the tensor alive, so an id is never reused while its entry exists; the block's end drops them.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _key(kind: tuple, w: torch.Tensor) -> tuple:
    return (kind, id(w), w._version, tuple(w.shape), w.dtype, str(w.device))


def shared(kind: tuple, w: torch.Tensor, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per ``kind`` and tensor within a :func:`shared_spectra` block (every call outside one)."""
    cache = _SHARED.get()
    if cache is None:
        return compute()
    key = _key(kind, w)
    if key not in cache:
        cache[key] = (w, compute())
    return cache[key][1]


def _has_shared(kind: tuple, w: torch.Tensor) -> bool:
    """Whether the current :func:`shared_spectra` block already holds ``kind`` for ``w``."""
    cache = _SHARED.get()
    return cache is not None and _key(kind, w) in cache


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` singular values of ``w [..., m, n]``, descending, float64: ``[..., min(m, n)]``.

    A wide matrix is decomposed as its transpose (same singular values): LAPACK's path for tall matrices is 3-5x
    faster on wide FFN and stacked projections.
    """
    def compute() -> torch.Tensor:
        w64 = w.to(torch.float64)
        with single_threaded():
            return torch.linalg.svdvals(w64.mT if w64.shape[-1] > w64.shape[-2] else w64)

    return shared(("svdvals",), w, compute)


def extreme_singular_values(w: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """``[upper sigma_max, sigma_min]`` of one matrix ``w [m, n]`` (float64): from ``eigvalsh`` of the Gram matrix of
    the smaller side when that is at least ``GRAM_MIN_DIM`` and the Weyl bracket ``lambda_min +- E`` (module docstring,
    "Gram path") puts sigma_min within ``rtol`` (relative); else from the SVD (:func:`singular_values`)."""
    def compute() -> torch.Tensor:
        if min(w.shape[-2:]) >= GRAM_MIN_DIM:
            lams, errs = _shared_gram_spectrum(w)
            lam, err = lams[0], float(errs[0])                                        # [r] ascending
            low, high = float(lam[0]) - err, float(lam[0]) + err
            if low > 0 and high ** 0.5 <= (1 + rtol) * low ** 0.5:
                return torch.tensor([(float(lam[-1]) + err) ** 0.5, float(lam[0]) ** 0.5], dtype=torch.float64)
        s = singular_values(w)
        return torch.stack([s[0], s[-1]])

    return shared(("extremes", rtol), w, compute)


def condition_number(w: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``sigma_max / (sigma_min + ridge)`` over the ``min(m, n)`` singular values of ``w [..., m, n]``.

    THEORY §14 uses ``ridge = 0`` (``inf`` for rank-deficient matrices); §13's ``kappa_eff`` uses ``ridge = 1e-6``.
    """
    s = singular_values(w)                                      # [..., r]
    return s[..., 0] / (s[..., -1] + ridge)


def smallest_singular_value(w: torch.Tensor) -> torch.Tensor:
    """``sigma_min`` over the ``min(m, n)`` singular values of ``w [..., m, n]`` (float64)."""
    return singular_values(w)[..., -1]


def norm_2_to_inf(w: torch.Tensor) -> torch.Tensor:
    """``||W||_{2->inf}`` for ``x -> x W``: the largest column l2 norm of ``w [..., m, n]`` (float64) -> ``[...]``."""
    return w.to(torch.float64).norm(dim=-2).amax(dim=-1)


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    """Normalise ``x [N, n]`` row-wise, leaving zero rows at zero."""
    nrm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(nrm > 0, nrm, torch.ones_like(nrm))


def _rayleigh_lower(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||W v|| / ||v||`` per matrix: ``w [N, m, n]``, ``v [N, n]`` -> ``[N]`` (a lower bound of sigma_max)."""
    return (w @ _unit_columns(v).unsqueeze(-1)).squeeze(-1).norm(dim=-1)


def _start_vectors(n_mat: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random start vectors ``[N, n]`` (generated on CPU so every device gives the same start)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_mat, n, generator=g, dtype=torch.float64).to(device)


def power_iteration(w: torch.Tensor, *, rtol: float = 1e-6, max_iter: int = 100,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batched power iteration on ``W^T W`` for ``w [N, m, n]`` (float64).

    Returns ``(sigma_lo [N], v [N, n], iterations)``. Every iterate is a lower bound of sigma_max: ``||W v||`` for a
    unit ``v`` and ``||W^T u|| / ||u||`` for ``u = W v``. Stops when no matrix improved by more than ``rtol``
    (relative) in one step, or after ``max_iter`` steps. This is a convergence test, not a certificate.
    """
    v = _unit_columns(_start_vectors(w.shape[0], w.shape[-1], seed, w.device))   # [N, n]
    best = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)         # [N]
    it = 0
    for it in range(1, max_iter + 1):
        u = (w @ v.unsqueeze(-1)).squeeze(-1)                                   # [N, m]
        un = u.norm(dim=-1)                                                      # [N]  ||W v||
        z = (w.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)                 # [N, n]
        zn = z.norm(dim=-1)                                                      # [N]
        step = torch.where(un > 0, zn / un.clamp_min(1e-300), un)               # >= ||W v|| (Cauchy-Schwarz)
        improved = step > best * (1 + rtol)
        best = torch.maximum(best, step)
        v = _unit_columns(z)
        if not bool(improved.any()):
            break
    return best, v, it


def _gram(w: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the smaller side of ``w [N, m, n]``: ``[N, r, r]``, r = min(m, n)."""
    return w.transpose(-1, -2) @ w if w.shape[-1] <= w.shape[-2] else w @ w.transpose(-1, -2)


def _gram_spectrum(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda [N, r] ascending, E [N])``: the eigenvalues of the Gram matrix of the smaller side of ``w [N, m, n]``
    (float64) and the Weyl bound ``E`` on each one's distance from the matching sigma^2 (module docstring, "Gram
    path")."""
    m, n = w.shape[-2:]
    r, long = min(m, n), max(m, n)
    eps = torch.finfo(torch.float64).eps
    gamma = long * eps / (1 - long * eps)
    with single_threaded():
        lam = torch.linalg.eigvalsh(_gram(w))                                    # [N, r]
    return lam, gamma * w.square().sum(dim=(-2, -1)) + 4 * r * eps * lam[..., -1].abs()


def _shared_gram_spectrum(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gram_spectrum` of ``w [..., m, n]`` as a stack ``[N, m, n]``, once per tensor within a
    :func:`shared_spectra` block: the sigma_max bracket and the extreme singular values read the same spectrum."""
    return shared(("gram_spectrum",), w, lambda: _gram_spectrum(_as_stack(w)[0]))


def _bracket(lam: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = lam[..., -1]                                                           # [N]
    return (top - err).clamp_min(0).sqrt(), (top.clamp_min(0) + err).sqrt()


def gram_eigen_bracket(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower [N], upper [N])`` around sigma_max of ``w [N, m, n]`` (float64) from ``eigvalsh`` of the Gram matrix
    of the smaller side (module docstring, "Gram path")."""
    return _bracket(*_gram_spectrum(w))


def gram_upper_bound(w: torch.Tensor, lower: torch.Tensor, *, rtol: float = 1e-6, max_squarings: int = 40,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Certified ``sigma_max`` bracket for ``w [N, m, n]`` (float64) by repeated squaring of the Gram matrix.

    Returns ``(lower [N], upper [N], squarings)``: ``upper = margin * ||G^k||_F^(1/(2k))`` and ``lower`` improved by
    ``||W' x|| / ||x||`` with ``x = G^k x0`` (``W'`` the side whose Gram is ``G``). Stops when
    ``upper <= (1 + rtol) lower`` for every matrix or after ``max_squarings`` squarings.
    """
    m, n = w.shape[-2:]
    r = min(m, n)
    side = w if n <= m else w.transpose(-1, -2)                                  # [N, *, r]: G = side^T side
    margin = 1.0 + 2.0 * (m + r) * r * torch.finfo(torch.float64).eps
    b = _gram(w)                                                                 # [N, r, r]
    fro = b.norm(dim=(-2, -1))                                                   # [N]
    zero = fro == 0
    log_scale = torch.log(torch.where(zero, torch.ones_like(fro), fro))          # log ||G^k||_F, k = 1
    b = b / torch.where(zero, torch.ones_like(fro), fro)[:, None, None]
    x0 = _start_vectors(w.shape[0], r, seed + 1, w.device)                       # [N, r]
    lower = lower.clone()
    k, j = 1, 0
    upper = torch.exp(log_scale / (2 * k)) * margin
    while True:
        x = (b @ x0.unsqueeze(-1)).squeeze(-1)                                   # [N, r]  ~ G^k x0
        lower = torch.maximum(lower, _rayleigh_lower(side, x))
        upper = torch.minimum(upper, torch.exp(log_scale / (2 * k)) * margin)
        done = zero | (upper <= lower * (1 + rtol))
        if bool(done.all()) or j >= max_squarings:
            break
        b = b @ b
        b = 0.5 * (b + b.transpose(-1, -2))                                      # symmetric in exact arithmetic
        nb = b.norm(dim=(-2, -1))
        ok = nb > 0
        b = b / torch.where(ok, nb, torch.ones_like(nb))[:, None, None]
        log_scale = 2 * log_scale + torch.log(torch.where(ok, nb, torch.ones_like(nb)))
        k, j = 2 * k, j + 1
    upper = torch.where(zero, torch.zeros_like(upper), upper)
    return torch.where(zero, torch.zeros_like(lower), lower), upper, j


def spectral_norm(w: torch.Tensor, *, rtol: float = 1e-6, max_iter: int = 100, max_squarings: int = 40,
                  exact_max_dim: int = EXACT_MAX_DIM, certify: bool = True, seed: int = 0) -> SpectralNorm:
    """``||W||_2`` of every matrix in ``w [..., m, n]`` with a certificate (module docstring).

    ``certify=False`` on the power path skips the Gram squarings and reports the cheap rigorous upper bound
    ``min(||W||_F, sqrt(||W||_1 ||W||_inf))``; ``certified`` is then true only where that bound already meets ``rtol``.
    """
    kind = ("spectral_norm", rtol, max_iter, max_squarings, exact_max_dim, certify, seed)
    return shared(kind, w, lambda: _spectral_norm(w, rtol, max_iter, max_squarings, exact_max_dim, certify, seed))


def _spectral_norm(w: torch.Tensor, rtol: float, max_iter: int, max_squarings: int, exact_max_dim: int,
                   certify: bool, seed: int) -> SpectralNorm:
    stack, batch = _as_stack(w)                                                  # [N, m, n]
    if stack.shape[0] == 0 or min(stack.shape[-2:]) == 0:
        zeros = torch.zeros(stack.shape[0], dtype=torch.float64, device=stack.device)
        return SpectralNorm(zeros.reshape(batch), zeros.reshape(batch), torch.ones_like(zeros, dtype=torch.bool)
                            .reshape(batch), "svd")
    if GRAM_MIN_DIM <= min(stack.shape[-2:]) <= exact_max_dim and not _has_shared(("svdvals",), w):
        lower, upper = _bracket(*_shared_gram_spectrum(w))
        certified = upper <= lower * (1 + rtol)
        return SpectralNorm(lower.reshape(batch), upper.reshape(batch), certified.reshape(batch), "gram")
    if min(stack.shape[-2:]) <= exact_max_dim:
        s = singular_values(w).reshape(-1, min(stack.shape[-2:]))[..., 0]        # [N]
        return SpectralNorm(s.reshape(batch), s.reshape(batch), torch.ones_like(s, dtype=torch.bool).reshape(batch),
                            "svd")
    lower, _, iters = power_iteration(stack, rtol=rtol, max_iter=max_iter, seed=seed)
    squarings = 0
    if certify:
        lower, upper, squarings = gram_upper_bound(stack, lower, rtol=rtol, max_squarings=max_squarings, seed=seed)
    else:
        one_inf = torch.sqrt(stack.abs().sum(-2).amax(-1) * stack.abs().sum(-1).amax(-1))
        upper = torch.minimum(stack.norm(dim=(-2, -1)), one_inf)
    certified = upper <= lower * (1 + rtol)
    return SpectralNorm(lower.reshape(batch), upper.reshape(batch), certified.reshape(batch), "power", iters,
                        squarings)


def spectral_norm_value(w: torch.Tensor, *, rtol: float = 1e-6, exact_max_dim: int = EXACT_MAX_DIM) -> torch.Tensor:
    """Certified upper value of ``||W||_2`` for ``w [..., m, n]`` (exact on the SVD path, <= rtol above otherwise).

    The upper end is reported because every consumer is an upper bound (THEORY §5.2, §6, §12).
    """
    return spectral_norm(w, rtol=rtol, exact_max_dim=exact_max_dim).upper


def relative_gap(est: SpectralNorm) -> torch.Tensor:
    """``(upper - value) / upper``: the certified relative distance of ``value`` below sigma_max (0 if both 0)."""
    denom = torch.where(est.upper > 0, est.upper, torch.ones_like(est.upper))
    return (est.upper - est.value) / denom


__all__ = [
    "EXACT_MAX_DIM", "GRAM_MIN_DIM", "SpectralNorm", "condition_number", "extreme_singular_values",
    "gram_eigen_bracket", "gram_upper_bound", "norm_2_to_inf", "power_iteration", "relative_gap", "shared",
    "singular_values", "smallest_singular_value", "spectral_norm", "spectral_norm_value",
]

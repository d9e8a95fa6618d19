"""Tier 3: a certified lower bound of the local Lipschitz constant of one layer, and tightness (THEORY §8.3, §8.4).

The layer is a function ``f: X [T, d] -> h_{l+1} [T, d]`` of one sequence (float64, eval mode, the model's masks and
RoPE, math SDPA so forward-mode AD works). ``||J_f(X)||_{inf,2} = max_i max_{||dx_j|| <= 1} ||sum_j T_ij dx_j||`` is
approached by alternating maximisation per candidate row ``i``: backward ``G = vjp(e_i (x) y)``, feasible direction
``dx_j = G_j / ||G_j||``, forward ``z = jvp(dX)_i``, ``y = z / ||z||``. Every iterate ``v_t = ||z_t||`` is the output
norm of a feasible perturbation, hence a lower bound, and ``v_t >= v_{t-1}``. The best ``(i, dX)`` is the certificate.
All candidate rows and restarts run together as one batch ("lanes"): the layer function takes a leading lane
dimension, so one graph serves every lane, and both products are plain reverse-mode autograd (:class:`Linearization`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnstab_cli.errors import ScanFailure
from attnstab_cli.metrics.threads import single_threaded
from attnstab_cli.model.blocks import run_layer
from attnstab_cli.model.config import ModelConfig
from attnstab_cli.model.weights import LayerWeights

F64 = torch.float64
LayerFn = Callable[[torch.Tensor], torch.Tensor]


def make_layer_function(weights: LayerWeights, cfg: ModelConfig, layer: int,
                        rope_cs: tuple[torch.Tensor, torch.Tensor] | None = None,
                        key_padding_mask: torch.Tensor | None = None) -> LayerFn:
    """``f(X [..., T, d]) -> [..., T, d]``: :func:`run_layer` on each sequence of the leading (lane) dimension, all
    with the same ``key_padding_mask [T]`` (or None).

    Weights and RoPE tables should match ``X``'s dtype; attention is pinned to the math SDPA backend, whose double
    backward (used for the jvp, :class:`Linearization`) is defined everywhere.
    """
    kpm = None if key_padding_mask is None else key_padding_mask.reshape(1, -1).bool()

    def f(x: torch.Tensor) -> torch.Tensor:
        batch = x.reshape(-1, *x.shape[-2:])                                                  # [L, T, d]
        mask = None if kpm is None else kpm.expand(batch.shape[0], -1)
        with sdpa_kernel(SDPBackend.MATH):
            return run_layer(batch, weights, cfg, layer, 0, rope_cs, mask).resid_out.reshape(x.shape)

    return f


def select_candidate_rows(n_rows: int, scores: torch.Tensor | None = None, n_top: int = 3, n_random: int = 4,
                          seed: int = 0) -> list[int]:
    """Candidate output rows (§8.3): the last row, the ``n_top`` rows with the largest ``scores [T]`` (when given)
    and ``n_random`` further distinct rows drawn with ``seed``; fewer when the sequence is short."""
    rows = [n_rows - 1]
    if scores is not None:
        for i in torch.argsort(scores.detach().cpu().to(F64), descending=True).tolist():
            if len(rows) >= 1 + n_top:
                break
            if i not in rows:
                rows.append(i)
    rest = [i for i in range(n_rows) if i not in rows]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    return rows + sorted(rest[j] for j in order[:n_random])


@dataclass(frozen=True)
class Certificate:
    """A feasible perturbation ``delta [T, d]`` (rows of norm <= 1) whose output row ``row`` has norm ``value``."""

    row: int
    delta: torch.Tensor
    value: float


@dataclass(frozen=True)
class EmpiricalResult:
    """Tier-3 result for one layer and sequence."""

    lip_layer_empirical: float
    certificate: Certificate
    rows: list[int]
    iterates: list[list[float]] = field(repr=False)   # per lane (row-major over rows, then restarts): v_1, v_2, ...


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    """``g / ||g_j||`` row by row, 0 where a row vanishes: feasible directions ``[..., T, d]``."""
    n = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return torch.where(n > 0, g / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(g))


def _initial_directions(n_lanes: int, d: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    y = torch.randn(n_lanes, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)).to(like.device)   # [lanes, d]


class Linearization:
    """``J_f(x)`` at ``lanes`` copies of ``x [T, d]``: ``vjp(c) = J^T c`` and ``jvp(u) = J u``, lane by lane.

    ``f`` must map ``[L, T, d] -> [L, T, d]`` lane by lane. The vjp is one backward through ``f``'s graph; the jvp
    uses the double-backward identity ``J u = d/dc <J^T c, u>`` on a graph of ``J^T c`` built once at ``c = 0`` (it is
    linear in ``c``). Forward-mode AD would do the jvp in one pass, but in torch it loads the compiler stack
    (about 1.5 s per process) and needs functorch's vmap for the lanes; this way both products are batched kernels
    and the scan imports neither.
    """

    def __init__(self, f: LayerFn, x: torch.Tensor, lanes: int) -> None:
        with torch.enable_grad():
            self.x = x.detach().expand(lanes, *x.shape).clone().requires_grad_(True)          # [L, T, d]
            self.y = f(self.x)
            self.c = torch.zeros_like(self.y, requires_grad=True)
            self.g = _grad(self.y, self.x, self.c, create_graph=True)                        # J^T c

    def vjp(self, c: torch.Tensor) -> torch.Tensor:
        return _grad(self.y, self.x, c)

    def jvp(self, u: torch.Tensor) -> torch.Tensor:
        if not self.g.requires_grad:                  # f constant in x: J = 0
            return torch.zeros_like(self.y)
        return _grad(self.g, self.c, u)


def _grad(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``d <y, weight> / dx`` (the vjp ``J^T weight``), graph kept. Differentiating the scalar ``<y, weight>`` rather
    than passing ``weight`` as ``grad_outputs`` gives the same product, but torch's check of tensor ``grad_outputs``
    imports its symbolic-shapes module (about 2 s per process)."""
    out = torch.autograd.grad((y * weight).sum(), x, retain_graph=True, create_graph=create_graph,
                              allow_unused=True)[0]
    return torch.zeros_like(x) if out is None else out


def compute_empirical_lipschitz(f: LayerFn, x: torch.Tensor, rows: list[int], restarts: int = 3,
                                max_iter: int = 100, rtol: float = 1e-6, seed: int = 0,
                                chunk_size: int | None = None, dtype: torch.dtype = F64) -> EmpiricalResult:
    """Alternating maximisation of §8.3 for ``f`` at ``x [T, d]`` over the output ``rows``, ``restarts`` each, in
    ``dtype`` (``f``'s weights must match it; only a float64 run certifies its own value, see
    :func:`compute_layer_empirical_budgeted`). ``f`` maps ``[L, T, d] -> [L, T, d]`` lane by lane; ``chunk_size``
    lanes share one graph (all lanes when None)."""
    x = x.to(dtype)
    t, d = x.shape
    lane_rows = torch.tensor([i for i in rows for _ in range(restarts)], device=x.device)   # [lanes]
    n = lane_rows.numel()
    onehot = torch.nn.functional.one_hot(lane_rows, t).to(dtype)                          # [lanes, T]
    step = n if chunk_size is None else max(1, chunk_size)
    chunks = [(s, Linearization(f, x, min(step, n - s))) for s in range(0, n, step)]
    backward = lambda c: torch.cat([lin.vjp(c[s:s + lin.x.shape[0]]) for s, lin in chunks])  # noqa: E731
    forward = lambda u: torch.cat([lin.jvp(u[s:s + lin.x.shape[0]]) for s, lin in chunks])   # noqa: E731
    y = _initial_directions(n, d, seed, x).to(dtype)
    best = torch.full((n,), -1.0, dtype=dtype, device=x.device)
    best_delta = torch.zeros(n, t, d, dtype=dtype, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    iterates: list[list[float]] = [[] for _ in range(n)]
    for _ in range(max_iter):
        idx = active.nonzero().flatten()
        every = _unit_rows(backward(onehot[:, :, None] * y[:, None, :]))                 # [lanes, T, d]
        delta = every[idx]                                                                  # [a, T, d]
        z = forward(every)[idx, lane_rows[idx]]                                            # [a, d]
        v = torch.linalg.vector_norm(z, dim=-1)                                           # [a]
        for lane, value in zip(idx.tolist(), v.tolist()):
            iterates[lane].append(value)
        improved = v > best[idx]
        best_delta[idx[improved]] = delta[improved]
        done = (v - best[idx]) <= rtol * v
        best[idx] = torch.maximum(best[idx], v)
        y[idx] = torch.where(v[:, None] > 0, z / v.clamp_min(torch.finfo(dtype).tiny)[:, None], y[idx])
        active[idx[done]] = False
        if not active.any():
            break
    lane = int(best.argmax())
    cert = Certificate(int(lane_rows[lane]), best_delta[lane], float(best[lane]))
    return EmpiricalResult(cert.value, cert, list(rows), iterates)


def evaluate_certificate(f: LayerFn, x: torch.Tensor, certificate: Certificate) -> float:
    """Re-evaluate a certificate with one ``jvp``: ``||(J_f(x) delta)_row||_2`` (rows of ``delta`` checked <= 1)."""
    row_norms = torch.linalg.vector_norm(certificate.delta, dim=-1)
    if float(row_norms.max()) > 1.0 + 1e-12:
        raise ValueError("certificate perturbation has a row of norm > 1: not feasible")
    z = Linearization(f, x.to(F64), 1).jvp(certificate.delta[None])[0]
    return float(torch.linalg.vector_norm(z[certificate.row]))


def compute_layer_empirical(weights: LayerWeights, cfg: ModelConfig, layer: int, hidden: torch.Tensor,
                            rope_cs: tuple[torch.Tensor, torch.Tensor] | None = None,
                            key_padding_mask: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                            restarts: int = 3, seed: int = 0, **kwargs: object) -> EmpiricalResult:
    """``lip_layer_empirical`` of one layer at one sequence ``hidden [T, d]`` (float64 weights and RoPE tables);
    ``scores [T]`` ranks candidate rows (the tier-2r row terms, §8.3)."""
    f = make_layer_function(weights, cfg, layer, rope_cs, key_padding_mask)
    rows = select_candidate_rows(hidden.shape[0], scores, seed=seed)
    return compute_empirical_lipschitz(f, hidden, rows, restarts=restarts, seed=seed, **kwargs)


SEARCH_PREFIX = 128          # tokens the tier-3 search runs on (causal layers), THEORY §8.3 "Budget"
SEARCH_RTOL = 1e-4           # early stop of a lane in the float32 search (its iterates rise by less than this)
MIN_LANE_ITERS = 8           # the budget never drops below this many lane-iterations


@dataclass(frozen=True)
class EmpiricalBudget:
    """How tier 3 ran on one sequence (recorded in the manifest): the search's prefix and dtype, the lane-iterations
    the budget allowed and those it used, and whether the prefix is exact for the layer (causal) or the whole
    sequence was searched (bidirectional)."""

    prefix: int
    search_dtype: str
    lanes: int
    allowed_lane_iters: int
    used_lane_iters: int
    whole_sequence: bool


def plan_lane_iterations(tokens_per_layer: int, prefix: int) -> int:
    """Lane-iterations that cost about one forward pass of the layer over its calibration tokens: one iteration of
    one lane is a vjp and a jvp on ``prefix`` tokens, about three forward passes of those tokens (§8.3 "Budget")."""
    return max(MIN_LANE_ITERS, tokens_per_layer // max(1, 3 * prefix))


def compute_layer_empirical_budgeted(
    weights: LayerWeights, weights64: LayerWeights, cfg: ModelConfig, layer: int, hidden: torch.Tensor,
    rope: Callable[[int, torch.dtype], tuple[torch.Tensor, torch.Tensor] | None],
    key_padding_mask: torch.Tensor | None, scores: torch.Tensor | None, tokens_per_layer: int, seed: int = 0,
) -> tuple[EmpiricalResult, EmpiricalBudget]:
    """Tier 3 under the budget of THEORY §8.3: search in float32, certify in float64.

    Causal layers are searched on the first ``SEARCH_PREFIX`` tokens (output rows inside a prefix depend only on
    it, so their Jacobian rows are those of the whole sequence); bidirectional layers on the whole sequence. The
    candidate rows are the best-scored row (``scores [T]``, the tier-2r row terms) and the last row of the searched
    span, one restart each; iterations stop early per lane and at the lane-iteration budget of
    :func:`plan_lane_iterations`. The best certificate is then re-evaluated by one float64 ``jvp`` (``weights64``),
    and that value is the result.
    """
    t = hidden.shape[0]
    whole = not cfg.layout.causal or t <= SEARCH_PREFIX
    n = t if whole else SEARCH_PREFIX
    kpm = None if key_padding_mask is None else key_padding_mask.reshape(-1)[:n]
    x32 = hidden[:n].to(torch.float32)
    f32 = make_layer_function(weights, cfg, layer, rope(n, torch.float32), kpm)
    rows = select_candidate_rows(n, None if scores is None else scores[:n], n_top=1, n_random=0, seed=seed)
    allowed = plan_lane_iterations(tokens_per_layer, n)
    with single_threaded():   # many small ops: one thread was 2-10x faster than two on 2 cores
        search = compute_empirical_lipschitz(f32, x32, rows, restarts=1, max_iter=max(1, allowed // len(rows)),
                                             rtol=SEARCH_RTOL, seed=seed, dtype=torch.float32)
        f64 = make_layer_function(weights64, cfg, layer, rope(n, F64), kpm)
        delta = search.certificate.delta.to(F64)
        delta = delta / torch.linalg.vector_norm(delta, dim=-1, keepdim=True).clamp_min(1.0)   # rows of norm ≤ 1
        value = evaluate_certificate(f64, hidden[:n].to(F64), Certificate(search.certificate.row, delta, 0.0))
    used = sum(len(v) for v in search.iterates)
    cert = Certificate(search.certificate.row, delta, value)
    budget = EmpiricalBudget(n, "float32", len(rows), allowed, used, whole)
    return EmpiricalResult(value, cert, search.rows, search.iterates), budget


class TightnessError(ScanFailure):
    """A lower bound exceeded an upper bound: a bound was used outside its hypotheses or the mapping is wrong."""


def tightness_tolerance(dtype: torch.dtype) -> float:
    """Allowed excess of ``lower / bound`` over 1 (§8.4): 1e-6 in float64, 1e-3 in lower precision."""
    return 1e-6 if dtype == F64 else 1e-3


def compute_tightness(lower: float, bound: float, dtype: torch.dtype = F64, what: str = "tightness") -> float:
    """``lower / bound`` on one sequence; raises :class:`TightnessError` above ``1 + tolerance``."""
    ratio = lower / bound
    if not ratio <= 1.0 + tightness_tolerance(dtype):
        raise TightnessError(f"{what} = {ratio:.9g} > 1: empirical lower bound {lower:.9g} exceeds the "
                             f"upper bound {bound:.9g}", hint="a bound was applied outside its hypotheses, or the "
                             "architecture mapping is wrong; rerun with --debug and report the checkpoint")
    return ratio


def compute_mean_tightness(lowers: list[float], bounds: list[float], dtype: torch.dtype = F64,
                           what: str = "tightness") -> float:
    """Mean of per-sequence ratios over ``empirical_seqs`` (§8.4), each checked by :func:`compute_tightness`."""
    if not lowers or len(lowers) != len(bounds):
        raise ValueError("need one bound per lower bound, at least one sequence")
    ratios = [compute_tightness(lo, b, dtype, what) for lo, b in zip(lowers, bounds)]
    return sum(ratios) / len(ratios)

"""Mergeable per-(layer, head) aggregation of attention-row statistics (THEORY §3.8, columns of §0.3).

One :class:`HeadAggregate` holds, for each of H heads, counts, sums, sums of squares, min, max and fixed-bin
histograms of θ_lo, θ_hi, p_max and normalised entropy, plus a 160-bin histogram of −log10(1 − θ_lo) that resolves
θ near 1. Counts, min, max and histograms merge exactly across batches, sequences and devices; sums merge up to
float64 reassociation. Percentiles come only from merged histograms as nearest-rank brackets (§3.8).
Rows with fewer than ``min_keys`` keys are excluded from the descriptive aggregates but not from θ̃ (§3.8, §5.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
from torch import Tensor

from attnstab_cli.distributed.group import Group

N_BINS = 1000                       # uniform bins on [0, 1], index min(floor(1000 x), 999)
N_LOG_BINS = 160                    # bins of width 0.1 on −log10(1 − θ_lo), clipped to [0, 16)
LOG_BIN_WIDTH = 0.1
DEFAULT_MIN_KEYS = 16
EXACT_WIDTH = 1e-12                 # θ_hi − θ_lo at or below which a row counts as exact (§0.3)
PEAKED_PMAX = 0.5                   # p_max ≥ 1/2: θ is exact in closed form (§2.3)
COLUMNS = ("n_rows", "n_rows_short", "theta_mean", "theta_hi_mean", "theta_lo_min", "theta_p05", "theta_p05_lo",
           "theta_p05_hi", "theta_p50", "theta_p50_lo", "theta_p50_hi", "theta_width_max", "theta_exact_frac",
           "theta_tilde_lo", "theta_tilde_hi", "theta_paper_mean", "pmax_mean", "pmax_max", "peaked_frac",
           "entropy_mean", "sink_mass_mean")
_REL_GUARD = 2.0 ** -50             # edges widened by a few ulps: a bin index is itself a rounded computation


def compute_linear_bins(x: Tensor) -> Tensor:
    """Histogram bin min(floor(1000 x), 999), clamped at 0, of values x (int64, same shape) (§3.8)."""
    return torch.floor(x.to(torch.float64) * N_BINS).clamp(0, N_BINS - 1).to(torch.int64)


def compute_log_bins(theta: Tensor) -> Tensor:
    """Bin of −log10(1 − θ) clipped to [0, 16), width 0.1 (int64, same shape); θ = 1 falls in the last bin."""
    y = -torch.log10((1.0 - theta.to(torch.float64)).clamp_min(0.0))      # +inf at θ = 1
    return torch.floor(y * (1.0 / LOG_BIN_WIDTH)).clamp(0, N_LOG_BINS - 1).to(torch.int64)


def linear_bin_edges() -> tuple[Tensor, Tensor]:
    """Lower and upper value edges (float64 [1000] each) of the linear bins, lower edges guarded by a few ulps."""
    edges = torch.arange(N_BINS + 1, dtype=torch.float64) / N_BINS         # [1001]
    return edges[:-1] * (1.0 - _REL_GUARD), edges[1:]


def log_bin_edges() -> tuple[Tensor, Tensor]:
    """θ-space lower and upper edges (float64 [160] each) of the −log10(1 − θ) bins, guarded against the rounding
    of log10 (relative 1e-12 on 1 − θ) and of 1 − u (2^-52 absolute); the last bin reaches θ = 1."""
    b = torch.arange(N_LOG_BINS + 1, dtype=torch.float64) * LOG_BIN_WIDTH  # [161]
    gap = 10.0 ** -b                                                       # 1 − θ at each edge
    lower = 1.0 - gap[:-1] * (1.0 + 1e-12) - 2.0 ** -52
    upper = (1.0 - gap[1:] * (1.0 - 1e-12) + 2.0 ** -52).clamp(max=1.0)
    upper[-1] = 1.0
    return lower.clamp_min(0.0), upper


def compute_nearest_rank(count: Tensor, q: float) -> Tensor:
    """Nearest rank k = ceil(q·N), at least 1, computed exactly in integers (q read as its decimal repr)."""
    frac = Fraction(repr(float(q)))
    if not 0 <= frac <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    k = (count * frac.numerator + frac.denominator - 1) // frac.denominator
    return k.clamp_min(1)


def compute_percentile_bracket(hist: Tensor, q: float, vmin: Tensor, vmax: Tensor, lower: Tensor,
                               upper: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest-rank q-quantile bracket from histograms hist [H, B] (§3.8): bin b where the cumulative count first
    reaches k = ceil(qN), bracket [max(lower_b, min x), min(upper_b, max x)]; float64 [H] each, NaN where N = 0."""
    cum = hist.cumsum(-1)                                                  # [H, B]
    k = compute_nearest_rank(cum[:, -1], q)                                # [H]
    b = torch.searchsorted(cum, k[:, None]).clamp(max=hist.shape[-1] - 1)[:, 0]  # [H]
    lo = torch.maximum(lower[b], vmin)
    hi = torch.minimum(upper[b], vmax)
    empty = cum[:, -1] == 0
    return lo.masked_fill(empty, math.nan), hi.masked_fill(empty, math.nan)


@dataclass
class Moments:
    """Mergeable summary of one metric per head: count, Σx, Σx² (int64/float64 [H]), min, max (±inf when empty)
    and the 1000-bin histogram (int64 [H, 1000])."""

    count: Tensor
    total: Tensor
    total_sq: Tensor
    minimum: Tensor
    maximum: Tensor
    hist: Tensor

    @classmethod
    def empty(cls, n_heads: int) -> Moments:
        """An empty summary for n_heads heads."""
        f64 = dict(dtype=torch.float64)
        return cls(torch.zeros(n_heads, dtype=torch.int64), torch.zeros(n_heads, **f64),
                   torch.zeros(n_heads, **f64), torch.full((n_heads,), math.inf, **f64),
                   torch.full((n_heads,), -math.inf, **f64), torch.zeros(n_heads, N_BINS, dtype=torch.int64))

    def update(self, head: Tensor, x: Tensor) -> None:
        """Add values x (float64 [R]) of heads ``head`` (int64 [R])."""
        n_heads = self.count.shape[0]
        self.count += torch.bincount(head, minlength=n_heads)
        self.total.index_add_(0, head, x)
        self.total_sq.index_add_(0, head, x * x)
        self.minimum.scatter_reduce_(0, head, x, "amin")
        self.maximum.scatter_reduce_(0, head, x, "amax")
        flat = head * N_BINS + compute_linear_bins(x)                      # [R]
        self.hist += torch.bincount(flat, minlength=n_heads * N_BINS).view(n_heads, N_BINS)

    def merge(self, other: Moments) -> Moments:
        """The summary of both inputs' rows (exact except Σ, Σx², which merge up to reassociation)."""
        return Moments(**{name: COMBINE[op](getattr(self, name), getattr(other, name)) for name, op in _MOMENT_OPS})

    def reduce_ranks(self, group: Group) -> None:
        """In place, the summary of every rank's rows (:meth:`merge` over the process group)."""
        for name, op in _MOMENT_OPS:
            group.all_reduce(getattr(self, name), op, "the theta aggregates")


_MOMENT_OPS = (("count", "sum"), ("total", "sum"), ("total_sq", "sum"), ("minimum", "min"), ("maximum", "max"),
               ("hist", "sum"))
COMBINE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


_INT_FIELDS = ("n_rows", "n_rows_short", "theta_exact_count", "peaked_count", "log_hist", "theta_paper_count",
               "sink_count")
_SUM_FIELDS = ("theta_paper_sum", "entropy_sum", "sink_mass_sum")
_MAX_FIELDS = ("theta_tilde_lo", "theta_tilde_hi", "theta_width_max")
_MOMENT_FIELDS = ("theta_lo", "theta_hi", "pmax", "entropy_norm")
_FIELD_OPS = tuple((name, "sum") for name in _INT_FIELDS + _SUM_FIELDS) + tuple((name, "max") for name in _MAX_FIELDS)


@dataclass
class HeadAggregate:
    """Per-head aggregates of one layer (§3.8); every tensor has a leading head dimension [H, ...].

    ``update`` takes per-row tensors with a per-row head index (or [H, rows] tensors with head=None).
    theta_tilde_* and theta_width_max start at −inf (no row yet); Moments min/max at ±inf.
    """

    min_keys: int
    theta_lo: Moments
    theta_hi: Moments
    pmax: Moments
    entropy_norm: Moments                  # entropy / log(n_keys); 0 for n_keys ≤ 1
    log_hist: Tensor                       # int64 [H, 160], −log10(1 − θ_lo)
    n_rows: Tensor                         # int64 [H], rows with n_keys ≥ min_keys
    n_rows_short: Tensor                   # int64 [H], rows excluded by min_keys
    theta_tilde_lo: Tensor                 # float64 [H], max θ_lo over ALL rows
    theta_tilde_hi: Tensor                 # float64 [H], max θ_hi over ALL rows
    theta_width_max: Tensor                # float64 [H]
    theta_exact_count: Tensor              # int64 [H]
    peaked_count: Tensor                   # int64 [H], p_max ≥ 1/2
    theta_paper_sum: Tensor                # float64 [H], Σ A5 estimate over the rows that have one
    entropy_sum: Tensor                    # float64 [H], Σ entropy in nats
    theta_paper_count: Tensor              # int64 [H], aggregated rows with an A5 estimate (it may be sampled)
    sink_mass_sum: Tensor                  # float64 [H], Σ 1 − m over aggregated rows of heads with a sink (§18.4)
    sink_count: Tensor                     # int64 [H], aggregated rows with a sink mass

    @classmethod
    def create(cls, n_heads: int, min_keys: int = DEFAULT_MIN_KEYS) -> HeadAggregate:
        """An empty aggregate for n_heads heads."""
        i64 = torch.zeros(n_heads, dtype=torch.int64)
        f64 = torch.zeros(n_heads, dtype=torch.float64)
        neg = torch.full((n_heads,), -math.inf, dtype=torch.float64)
        return cls(min_keys, *(Moments.empty(n_heads) for _ in _MOMENT_FIELDS),
                   torch.zeros(n_heads, N_LOG_BINS, dtype=torch.int64), i64, i64.clone(), neg, neg.clone(),
                   neg.clone(), i64.clone(), i64.clone(), f64, f64.clone(), i64.clone(), f64.clone(), i64.clone())

    @property
    def n_heads(self) -> int:
        """Number of heads H."""
        return self.n_rows.shape[0]

    def update(self, head: Tensor | None, *, theta_lo: Tensor, theta_hi: Tensor, pmax: Tensor, entropy: Tensor,
               n_keys: Tensor, theta_paper: Tensor, exact: Tensor | None = None,
               sink_mass: Tensor | None = None) -> None:
        """Add rows: head (int64 [R]) and per-row float θ_lo, θ_hi, p_max, entropy (nats), n_keys, A5 estimate
        (NaN for a row left out of the A5 sample); ``exact`` (bool [R]) overrides the width test
        θ_hi − θ_lo ≤ 1e-12 (e.g. to ignore `theta_slack`); ``sink_mass`` the sink's share 1 − m of rows whose
        softmax holds a sink logit (§18.4), None for heads without one (``sink_mass_mean`` is then null)."""
        rows = _flatten_rows(head, self.n_heads, theta_lo=theta_lo, theta_hi=theta_hi, pmax=pmax,
                             entropy=entropy, n_keys=n_keys, theta_paper=theta_paper, exact=exact,
                             sink_mass=sink_mass)
        head, lo, hi = rows["head"], rows["theta_lo"], rows["theta_hi"]
        self.theta_tilde_lo.scatter_reduce_(0, head, lo, "amax")
        self.theta_tilde_hi.scatter_reduce_(0, head, hi, "amax")
        long = rows["n_keys"] >= self.min_keys                             # [R]
        self.n_rows_short += torch.bincount(head[~long], minlength=self.n_heads)
        head, sel = head[long], {k: v[long] for k, v in rows.items() if k != "head"}
        self.n_rows += torch.bincount(head, minlength=self.n_heads)
        ent_norm = sel["entropy"] / sel["n_keys"].clamp_min(2).log()
        ent_norm = torch.where(sel["n_keys"] > 1, ent_norm, 0.0)
        for name, x in zip(_MOMENT_FIELDS, (sel["theta_lo"], sel["theta_hi"], sel["pmax"], ent_norm)):
            getattr(self, name).update(head, x)
        flat = head * N_LOG_BINS + compute_log_bins(sel["theta_lo"])       # [R']
        self.log_hist += torch.bincount(flat, minlength=self.n_heads * N_LOG_BINS).view(self.n_heads, N_LOG_BINS)
        width = sel["theta_hi"] - sel["theta_lo"]
        self.theta_width_max.scatter_reduce_(0, head, width, "amax")
        is_exact = sel["exact"] if exact is not None else width <= EXACT_WIDTH
        self.theta_exact_count += torch.bincount(head[is_exact], minlength=self.n_heads)
        self.peaked_count += torch.bincount(head[sel["pmax"] >= PEAKED_PMAX], minlength=self.n_heads)
        has_paper = ~torch.isnan(sel["theta_paper"])
        self.theta_paper_count += torch.bincount(head[has_paper], minlength=self.n_heads)
        self.theta_paper_sum.index_add_(0, head[has_paper], sel["theta_paper"][has_paper])
        self.entropy_sum.index_add_(0, head, sel["entropy"])
        if "sink_mass" in sel:
            self.sink_count += torch.bincount(head, minlength=self.n_heads)
            self.sink_mass_sum.index_add_(0, head, sel["sink_mass"])

    def merge(self, other: HeadAggregate) -> HeadAggregate:
        """A new aggregate of both inputs' rows: exact for counts, min, max and histograms (§3.8)."""
        if other.n_heads != self.n_heads or other.min_keys != self.min_keys:
            raise ValueError("can only merge aggregates with the same number of heads and min_keys")
        merged = {name: getattr(self, name).merge(getattr(other, name)) for name in _MOMENT_FIELDS}
        for name, op in _FIELD_OPS:
            merged[name] = COMBINE[op](getattr(self, name), getattr(other, name))
        return replace(self, **merged)

    def reduce_ranks(self, group: Group) -> None:
        """In place, the aggregate of every rank's rows (:meth:`merge` over the process group: all-reduce of the
        counts, sums and histograms, max of the maxima, min of the minima)."""
        for name in _MOMENT_FIELDS:
            getattr(self, name).reduce_ranks(group)
        for name, op in _FIELD_OPS:
            group.all_reduce(getattr(self, name), op, "the theta aggregates")

    def compute_theta_percentile(self, q: float) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest-rank q-quantile of θ_lo per head (§3.8): (lo, hi, midpoint), float64 [H], NaN where n_rows = 0.

        The bracket is the intersection of the brackets from the linear and the −log10(1 − θ) histograms (both
        contain the quantile), so it resolves θ near 1.
        """
        m = self.theta_lo
        lo1, hi1 = compute_percentile_bracket(m.hist, q, m.minimum, m.maximum, *linear_bin_edges())
        lo2, hi2 = compute_percentile_bracket(self.log_hist, q, m.minimum, m.maximum, *log_bin_edges())
        lo, hi = torch.maximum(lo1, lo2), torch.minimum(hi1, hi2)
        return lo, hi, (lo + hi) / 2.0

    def finalize(self) -> dict[str, list[int | float | None]]:
        """Report columns (:data:`COLUMNS`, §0.3) as one list per column with an entry per head.

        Means are over aggregated rows (n_keys ≥ min_keys). Every value is finite: None where a head has no
        aggregated row (theta_tilde_*: no row at all), never NaN or a sentinel.
        """
        n = self.n_rows.to(torch.float64)
        cols: dict[str, Tensor] = {
            "n_rows": self.n_rows, "n_rows_short": self.n_rows_short,
            "theta_mean": self.theta_lo.total / n, "theta_hi_mean": self.theta_hi.total / n,
            "theta_lo_min": self.theta_lo.minimum, "theta_width_max": self.theta_width_max,
            "theta_exact_frac": self.theta_exact_count / n, "theta_tilde_lo": self.theta_tilde_lo,
            "theta_tilde_hi": self.theta_tilde_hi,
            "theta_paper_mean": self.theta_paper_sum / self.theta_paper_count.to(torch.float64),
            "pmax_mean": self.pmax.total / n, "pmax_max": self.pmax.maximum, "peaked_frac": self.peaked_count / n,
            "entropy_mean": self.entropy_sum / n,
            "sink_mass_mean": self.sink_mass_sum / self.sink_count.to(torch.float64)}
        for q, tag in ((0.05, "p05"), (0.5, "p50")):
            lo, hi, mid = self.compute_theta_percentile(q)
            cols.update({f"theta_{tag}": mid, f"theta_{tag}_lo": lo, f"theta_{tag}_hi": hi})
        any_row = (self.n_rows + self.n_rows_short) > 0
        out = {}
        for name in COLUMNS:
            valid = any_row if name.startswith("theta_tilde") else self.n_rows > 0
            if name == "theta_paper_mean":
                valid = self.theta_paper_count > 0
            if name == "sink_mass_mean":
                valid = self.sink_count > 0
            values = cols[name].tolist()
            out[name] = [v if ok or name.startswith("n_rows") else None for v, ok in zip(values, valid.tolist())]
        return out


def _flatten_rows(head: Tensor | None, n_heads: int, **rows: Tensor | None) -> dict[str, Tensor]:
    """Per-row inputs as flat float64 (n_keys int64, exact bool) tensors [R] plus a head index; [H, rows] inputs
    with head=None get head = row's first index. Rejects mismatched shapes, bad head ids and NaN."""
    ref = rows["theta_lo"]
    if head is None:
        if ref.ndim != 2 or ref.shape[0] != n_heads:
            raise ValueError(f"with head=None, inputs must be [H={n_heads}, rows], got {tuple(ref.shape)}")
        head = torch.arange(n_heads)[:, None].expand(ref.shape)
    out = {"head": head.reshape(-1).to("cpu", torch.int64)}
    for name, x in rows.items():
        if x is None:
            continue
        if x.shape != head.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(head.shape)}")
        dtype = {"n_keys": torch.int64, "exact": torch.bool}.get(name, torch.float64)
        out[name] = x.detach().reshape(-1).to("cpu", dtype)
    if out["head"].numel() and not (0 <= int(out["head"].min()) and int(out["head"].max()) < n_heads):
        raise ValueError(f"head index out of range [0, {n_heads})")
    if any(bool(torch.isnan(v).any()) for k, v in out.items() if v.dtype == torch.float64 and k != "theta_paper"):
        raise ValueError("row statistics must not be NaN (theta_paper may be, for rows outside its sample)")
    return out

"""θ for every attention row of every head, streamed layer by layer (THEORY §3.7 compute policy, §3.8 aggregation).

Per (layer, batch):

1. **Full coverage.** One pass of the row statistics over the keys per query block, vectorised over rows and heads,
   on the layer's device (fused Triton kernel on CUDA, the chunked torch reference elsewhere): p_max, 1 − p_max,
   entropy, θ exactly where p_max ≥ ½, and elsewhere θ_lo the best of the streaming bound and the O(n) natural-order
   subsets (§3.5), θ_hi the cardinality bound from n, p_max and p_min (1 unless no subset can reach mass ½). Each path
   states how far its logits' rounding can move θ (``RowStats.theta_err``: 0 for float64 logits); that amount widens the
   row's interval.
2. **Refinement.** Rows still wider than ``tol``: all with n ≤ 20 keys and up to ``rows_per_head`` others per head
   and sequence (a random choice seeded per layer and sequence when more qualify, so means stay unbiased and the
   rows do not depend on batching or ranks; ``None`` refines every wide row) are recomputed in float64 from the
   recorded q, k, batched, and get A1 (n ≤ 20) or A2 + A3. ``tol = 0`` refines every row not yet exact.
3. **The paper's estimator** A5 needs a sort: computed on every row on an accelerator, on a sample of ``paper_rows``
   rows per head and sequence (seeded per layer and sequence) on the CPU (the paper itself sampled rows, App. E.1).
4. **Slack and aggregation.** θ_lo − slack, θ_hi + slack (``theta_slack``, §3.1), then a mergeable per-head summary;
   θ̃ uses every row, the descriptive columns only rows with at least ``min_keys`` keys.

With a sink logit per head (§18.4) every step runs on the keys' renormalized row q, and each bound is reported as
θ_sink = m(1 − m) + m² θ(q) of the row's own m (:func:`~attnstab_cli.reference.row_stats.apply_sinks`); p_max is of
the model's key probabilities m·q, the entropy over the n + 1 outcomes, and ``sink_mass_mean`` the mean of 1 − m.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from attnstab_cli.distributed.group import Group
from attnstab_cli.kernel_dispatch import attn_row_stats
from attnstab_cli.metrics.aggregate import EXACT_WIDTH, HeadAggregate
from attnstab_cli.metrics.theta import DEFAULT_TOP_K, EXACT_MAX_KEYS, THETA_SLACK, compute_theta_interval, \
    compute_theta_paper
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.metrics.seeding import sequence_rand
from attnstab_cli.model.traces import AttentionTrace, LayerTrace
from attnstab_cli.reference.attention_rows import compute_masked_softmax, compute_row_logits, compute_sink_mass
from attnstab_cli.reference.row_stats import compute_sink_theta

if TYPE_CHECKING:
    from attnstab_cli.metrics.layer_context import LayerContext

_BLOCK_ELEMENTS = 1 << 20   # float64 probabilities per batch of recomputed rows (8 MiB)
PAPER_ROWS_CPU = 32         # A5 rows sampled per head and sequence where sorting every row is not cheap


@dataclass(frozen=True)
class ThetaOptions:
    """Knobs of the θ pass; defaults are THEORY's (§3.1 slack, §3.4 k, §3.7 rows per head, §3.8 min_keys)."""

    kernel: str = "torch"               # resolved kernel: "torch" or "triton"
    min_keys: int = 16                  # rows with fewer unmasked keys are left out of the descriptive aggregates
    tol: float = 1e-6                   # refine rows whose certified interval is wider than this
    rows_per_head: int | None = 256     # refinement budget per head per sequence; None = every wide row
    top_k: int = DEFAULT_TOP_K          # A3 enumeration size
    slack: float = THETA_SLACK          # `theta_slack`: upstream float32 rounding of q, k (§3.1)
    seed: int = 0                       # choice of refined and of A5-sampled rows
    paper_rows: int | None | Literal["auto"] = "auto"   # A5 rows per head and sequence; None = every row;
                                                         # "auto" = resolve_paper_rows(device) (§3.7)


def resolve_paper_rows(opts: ThetaOptions, device: torch.device) -> int | None:
    """``paper_rows`` for ``device``: "auto" is every row where sorting is cheap (an accelerator), else
    PAPER_ROWS_CPU sampled rows per head and sequence (§3.7)."""
    if opts.paper_rows != "auto":
        return opts.paper_rows
    return None if device.type == "cuda" else PAPER_ROWS_CPU


@dataclass
class RowValues:
    """Per-row values of one batch, float64 ``[B, H, T]`` (before the slack); ``paper`` NaN where not sampled."""

    lo: Tensor
    hi: Tensor
    pmax: Tensor
    entropy: Tensor
    paper: Tensor
    n_keys: Tensor
    sink_mass: Tensor | None = None     # 1 − m per row with a sink logit (§18.4); None without


def _select_rows(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(b, h, i) int64 index tensors of the True entries of ``mask [B, H, T]``."""
    idx = torch.nonzero(mask)
    return idx[:, 0], idx[:, 1], idx[:, 2]


def _row_chunks(n_rows: int, t_k: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, t_k))
    return [slice(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]


def _probabilities(a: AttentionTrace, b: Tensor, h: Tensor, i: Tensor) -> tuple[Tensor, Tensor | None]:
    """The keys' renormalized rows q ``[R, T_k]`` (float64), on which θ is computed, and each row's sink mass 1 − m
    ``[R]`` (None without sinks, §18.4)."""
    s, allowed = compute_row_logits(a.q, a.k, a.scale, b, h, i, causal=a.causal, window=a.window,
                                    key_padding_mask=a.key_padding_mask, logit_cap=a.logit_cap)
    sink_mass = None if a.sinks is None else compute_sink_mass(s, allowed, a.sinks.to(s.device)[h.to(s.device)])
    return compute_masked_softmax(s, allowed), sink_mass


def _to_sink_rows(theta: Tensor, sink_mass: Tensor | None) -> Tensor:
    """θ of renormalized rows as θ_sink of the model's rows (identity without sinks); endpoints map to endpoints."""
    return theta if sink_mass is None else compute_sink_theta(theta, sink_mass.to(theta.device))


class ThetaPass:
    """Per-head θ aggregates of every layer from streamed traces (one :class:`HeadAggregate` per layer); publishes
    each trace's per-row θ_hi on the layer context for tier 2."""

    name = "theta"
    needs: tuple[str, ...] = ()

    def __init__(self, n_heads: int, n_kv_heads: int, opts: ThetaOptions) -> None:
        self.opts, self.n_heads, self.n_kv_heads = opts, n_heads, n_kv_heads
        self.layers: dict[int, HeadAggregate] = {}
        self.wide_rows: dict[int, Tensor] = {}          # layer -> int64 [H], rows left wider than tol
        self.refined_rows = 0                           # rows given A1 or A2 + A3
        self.unrefined_rows = 0                         # wide rows left out by the rows_per_head budget
        self.paper_sampled_rows = 0                     # rows that got the A5 estimate

    def observe(self, trace: LayerTrace, ctx: LayerContext | None = None) -> None:
        o = self.opts
        v = self.measure(trace.attn, trace.layer, trace.first_seq)
        width = v.hi - v.lo                                                 # [B, H, T]
        lo = (v.lo - o.slack).clamp(0.0, 1.0)
        hi = (v.hi + o.slack).clamp(0.0, 1.0)
        if ctx is not None:
            ctx.theta_hi = list(hi.unbind(0))                               # the bound input of tier 2 (§5.2)
        agg = self.layers.setdefault(trace.layer, HeadAggregate.create(self.n_heads, min_keys=o.min_keys))
        wide = self.wide_rows.setdefault(trace.layer, torch.zeros(self.n_heads, dtype=torch.int64))
        wide += (width > o.tol).sum((0, 2))

        def heads_first(x: Tensor) -> Tensor:
            return x.transpose(0, 1).flatten(1)                             # [B, H, T] -> [H, B·T]

        agg.update(None, theta_lo=heads_first(lo), theta_hi=heads_first(hi), pmax=heads_first(v.pmax),
                   entropy=heads_first(v.entropy), n_keys=heads_first(v.n_keys), theta_paper=heads_first(v.paper),
                   exact=heads_first(width <= EXACT_WIDTH),
                   sink_mass=None if v.sink_mass is None else heads_first(v.sink_mass))

    def measure(self, a: AttentionTrace, layer: int = 0, first_seq: int = 0) -> RowValues:
        """Per-row values of every row of one batch: full coverage, then refinement and A5 (module docstring);
        the sampled rows are drawn per (layer, sequence), ``first_seq`` the global index of the batch's first."""
        o = self.opts
        st = attn_row_stats(a.q, a.k, a.scale, causal=a.causal, key_padding_mask=a.key_padding_mask,
                            window=a.window, kernel=o.kernel, logit_cap=a.logit_cap, sinks=a.sinks)
        err = st.theta_err                                                  # [B, H, T], logit rounding (§3.7)
        lo = (st.theta_lo - err).clamp_min(0.0).cpu()
        hi = torch.where(st.theta_hi >= 1.0, 1.0, (st.theta_hi + err).clamp_max(1.0)).cpu()
        n_keys = st.n_keys.cpu()
        self._refine(a, lo, hi, n_keys, layer, first_seq)
        sink_mass = None if st.sink_mass is None else st.sink_mass.cpu()
        return RowValues(lo, hi, st.pmax.cpu().nan_to_num(0.0), st.entropy.cpu().nan_to_num(0.0),
                         self._paper(a, n_keys, layer, first_seq), n_keys, sink_mass)

    def _refine(self, a: AttentionTrace, lo: Tensor, hi: Tensor, n_keys: Tensor, layer: int, first_seq: int) -> None:
        """A1 or A2 + A3 in float64 on the chosen wide rows, in place on ``lo``, ``hi`` ``[B, H, T]``."""
        o = self.opts
        width = hi - lo
        wide = width > o.tol
        chosen = self._choose(wide, n_keys, layer, first_seq)
        self.unrefined_rows += int((wide & ~chosen).sum())
        b, h, i = _select_rows(chosen)
        for rows in _row_chunks(b.numel(), a.k.shape[2]):
            p, sink_mass = _probabilities(a, b[rows], h[rows], i[rows])     # [r, T_k], [r] | None
            iv = compute_theta_interval(p, top_k=o.top_k, slack=0.0, tol=o.tol)
            at = (b[rows], h[rows], i[rows])
            lo[at] = torch.maximum(lo[at], _to_sink_rows(iv.lo, sink_mass).cpu())
            hi[at] = torch.minimum(hi[at], _to_sink_rows(iv.hi, sink_mass).cpu())
        self.refined_rows += int(b.numel())

    def _choose(self, wide: Tensor, n_keys: Tensor, layer: int, first_seq: int) -> Tensor:
        """Wide rows to refine (bool ``[B, H, T]``): all with ≤ 20 keys, plus up to ``rows_per_head`` others per head
        and sequence, drawn at random (seeded per layer and sequence) when more qualify."""
        if self.opts.rows_per_head is None:
            return wide
        short = wide & (n_keys <= EXACT_MAX_KEYS)
        rest = wide & ~short
        score = sequence_rand(self.opts.seed, "refine", first_seq, rest.shape, layer).masked_fill(~rest, -1.0)
        k = min(self.opts.rows_per_head, rest.shape[-1])
        top = score.topk(k, dim=-1).indices                                # [B, H, k]
        picked = torch.zeros_like(rest).scatter_(-1, top, True) & rest
        return short | picked

    def _paper(self, a: AttentionTrace, n_keys: Tensor, layer: int, first_seq: int) -> Tensor:
        """A5 (§3.6) of the sampled rows (every row when ``paper_rows`` is None), NaN elsewhere, ``[B, H, T]``."""
        o = self.opts
        eligible = n_keys >= o.min_keys
        if o.paper_rows is None or o.paper_rows == "auto":
            chosen = eligible
        else:
            score = sequence_rand(o.seed, "paper", first_seq, eligible.shape, layer).masked_fill(~eligible, -1.0)
            top = score.topk(min(o.paper_rows, eligible.shape[-1]), dim=-1).indices
            chosen = torch.zeros_like(eligible).scatter_(-1, top, True) & eligible
        out = torch.full(n_keys.shape, float("nan"), dtype=torch.float64)
        b, h, i = _select_rows(chosen)
        for rows in _row_chunks(b.numel(), a.k.shape[2]):
            p, sink_mass = _probabilities(a, b[rows], h[rows], i[rows])
            out[b[rows], h[rows], i[rows]] = _to_sink_rows(compute_theta_paper(p), sink_mass).cpu()
        self.paper_sampled_rows += int(b.numel())
        return out

    def merge_ranks(self, group: Group) -> None:
        """Every layer's aggregate and row counts summed (extrema: max/min) over the ranks."""
        for layer in sorted(self.layers):
            self.layers[layer].reduce_ranks(group)
            group.all_reduce(self.wide_rows[layer], "sum", "the theta aggregates")
        counts = torch.tensor([self.refined_rows, self.unrefined_rows, self.paper_sampled_rows], dtype=torch.int64)
        self.refined_rows, self.unrefined_rows, self.paper_sampled_rows = group.all_reduce(counts, "sum").tolist()

    def finish(self, tables: Tables) -> TableParts:
        o = self.opts
        facts = {"min_keys": o.min_keys, "tol": o.tol, "rows_per_head": o.rows_per_head, "top_k": o.top_k,
                 "slack": o.slack, "refined_rows": self.refined_rows, "unrefined_rows": self.unrefined_rows,
                 "paper_rows": "all" if o.paper_rows is None else
                 f"{o.paper_rows} sampled per head and sequence (seeded)",
                 "paper_sampled_rows": self.paper_sampled_rows}
        return TableParts(heads=self.records(), facts={"theta": facts})

    def records(self) -> list[dict]:
        """One record per (layer, head) with the θ columns of THEORY §0.3."""
        group = self.n_heads // self.n_kv_heads
        out = []
        for layer, agg in sorted(self.layers.items()):
            cols = agg.finalize()
            wide = self.wide_rows[layer].tolist()
            for head in range(self.n_heads):
                out.append({"layer": layer, "head": head, "kv_head": head // group,
                            **{name: values[head] for name, values in cols.items()},
                            "theta_wide_rows": wide[head]})
        return out

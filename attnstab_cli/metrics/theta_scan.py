"""θ for every attention row of every head, streamed layer by layer (THEORY §3.7 compute policy, §3.8 aggregation).

Per (layer, batch):

1. **Row statistics** (fused Triton kernel on CUDA, chunked torch reference elsewhere; both accumulate in the compute
   dtype, float32 by default) give every row's key count and which rows the streaming interval does not yet pin to
   ``tol``: the candidates for refinement.
2. **Float64 rows.** Per query block (all heads, never an n × n matrix per head set) the probabilities are formed in
   float64 from the recorded q, k: p_max, 1 − p_max (accumulated) and entropy; θ exactly where p_max ≥ ½; elsewhere
   θ_lo the best of the same streaming bounds recomputed in float64 — max(4p(1−p), (1−p)(1+p)) and the natural-order
   prefix crossing — and the paper's sorted-prefix estimate A5 (computed for every row; a concrete subset, so also a
   lower bound); θ_hi = 1.
3. **Refinement.** Among the rows step 1 left wider than ``tol``: A1 (n ≤ 20) or A2 + A3, for all rows with n ≤ 20
   and up to ``rows_per_head`` others per head and sequence (a seeded random choice when more qualify, so means stay
   unbiased; ``None`` refines every wide row).
4. **Slack and aggregation.** θ_lo − slack, θ_hi + slack (``theta_slack``, §3.1), then a mergeable per-head summary;
   θ̃ uses every row, the descriptive columns only rows with at least ``min_keys`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnstab_cli.kernel_dispatch import attn_row_stats
from attnstab_cli.metrics.aggregate import EXACT_WIDTH, HeadAggregate
from attnstab_cli.metrics.theta import (DEFAULT_TOP_K, EXACT_MAX_KEYS, THETA_SLACK, compute_balanced,
                                        compute_pmax_entropy, compute_theta_interval, compute_theta_paper)
from attnstab_cli.model.masks import compute_allowed
from attnstab_cli.reference.row_stats import compute_prefix_crossing
from attnstab_cli.model.traces import AttentionTrace, LayerTrace

_BLOCK_ELEMENTS = 1 << 20   # float64 probabilities per query block, all heads together (8 MiB)


@dataclass(frozen=True)
class ThetaOptions:
    """Knobs of the θ pass; defaults are THEORY's (§3.1 slack, §3.4 k, §3.7 rows per head, §3.8 min_keys)."""

    kernel: str = "torch"               # resolved kernel: "torch" or "triton"
    min_keys: int = 16                  # rows with fewer unmasked keys are left out of the descriptive aggregates
    tol: float = 1e-6                   # refine rows whose certified interval is wider than this
    rows_per_head: int | None = 256     # refinement budget per head per sequence; None = every wide row
    top_k: int = DEFAULT_TOP_K          # A3 enumeration size
    slack: float = THETA_SLACK          # `theta_slack`: upstream float32 rounding of q, k (§3.1)
    seed: int = 0                       # choice of refined rows when more than the budget qualify


def compute_row_probabilities(a: AttentionTrace, b: int, rows: slice) -> Tensor:
    """Float64 softmax rows ``[H, R, T_k]`` of sequence ``b`` for query ``rows``: p = exp(s − lse) with s recomputed
    from the recorded q, k (§3.1); masked keys are exactly 0, as are all keys of a row with none allowed."""
    h, h_kv = a.q.shape[1], a.k.shape[1]
    q = a.q[b, :, rows].double().unflatten(0, (h_kv, h // h_kv))           # [H_kv, G, R, D]
    k = a.k[b].double()[:, None]                                            # [H_kv, 1, T_k, D] (GQA by broadcast)
    logits = (a.scale * q @ k.transpose(-1, -2)).flatten(0, 1)              # [H, R, T_k]
    pad = a.key_padding_mask[b:b + 1] if a.key_padding_mask is not None else None
    allowed = compute_allowed(rows.start, rows.stop, a.q.shape[2], a.k.shape[2], causal=a.causal, window=a.window,
                              key_padding_mask=pad, device=a.q.device)[0, 0]   # [R, T_k]
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)                     # [H, R, 1]
    return torch.exp(logits - lse).nan_to_num(0.0)                          # fully masked rows: NaN -> 0


class ThetaObserver:
    """Per-head θ aggregates of every layer from streamed traces (one :class:`HeadAggregate` per layer)."""

    def __init__(self, n_heads: int, n_kv_heads: int, opts: ThetaOptions) -> None:
        self.opts, self.n_heads, self.n_kv_heads = opts, n_heads, n_kv_heads
        self.layers: dict[int, HeadAggregate] = {}
        self.wide_rows: dict[int, Tensor] = {}          # layer -> int64 [H], rows left wider than tol
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.refined_rows = 0                           # rows given A1 or A2 + A3
        self.unrefined_rows = 0                         # wide rows left out by the rows_per_head budget
        self.last_theta_hi: list[Tensor] = []           # per sequence of the last trace: θ_hi + slack, [H, T]

    def observe(self, trace: LayerTrace) -> None:
        a, o = trace.attn, self.opts
        stats = attn_row_stats(a.q, a.k, a.scale, causal=a.causal, key_padding_mask=a.key_padding_mask,
                               window=a.window, kernel=o.kernel)
        wide_stream = (stats.theta_hi_stream - stats.theta_lo).cpu() > o.tol  # [B, H, T], refinement candidates
        n_keys = stats.n_keys.cpu()
        agg = self.layers.setdefault(trace.layer, HeadAggregate.create(self.n_heads, min_keys=o.min_keys))
        wide = self.wide_rows.setdefault(trace.layer, torch.zeros(self.n_heads, dtype=torch.int64))
        self.last_theta_hi = []
        for b in range(a.q.shape[0]):
            rows = self._measure_sequence(a, b, n_keys[b], wide_stream[b])
            width = rows["hi"] - rows["lo"]
            wide += (width > o.tol).sum(-1)
            self.last_theta_hi.append((rows["hi"] + o.slack).clamp(0.0, 1.0))   # the bound input of tier 2 (§5.2)
            agg.update(None, theta_lo=(rows["lo"] - o.slack).clamp(0.0, 1.0),
                       theta_hi=(rows["hi"] + o.slack).clamp(0.0, 1.0), pmax=rows["pmax"], entropy=rows["entropy"],
                       n_keys=n_keys[b], theta_paper=rows["paper"], exact=width <= EXACT_WIDTH)

    def _measure_sequence(self, a: AttentionTrace, b: int, n_keys: Tensor, wide_stream: Tensor) -> dict[str, Tensor]:
        """Float64 per-row values ``[H, T]`` of sequence ``b`` (lo, hi, pmax, entropy, paper), one query block at a
        time: p_max, 1 − p_max and entropy from the rows, θ exact where p_max ≥ ½, A5 for every row, A1 or A2 + A3
        for the chosen rows among those the row-statistics path left wider than ``tol``."""
        o, t_q, t_k = self.opts, a.q.shape[2], a.k.shape[2]
        block = max(1, _BLOCK_ELEMENTS // max(1, self.n_heads * t_k))
        chosen = self._choose(wide_stream, n_keys)                          # [H, T]
        self.unrefined_rows += int((wide_stream & ~chosen).sum())
        out = {name: torch.zeros(self.n_heads, t_q, dtype=torch.float64)
               for name in ("lo", "hi", "pmax", "entropy", "paper")}
        for start in range(0, t_q, block):
            rows = slice(start, min(t_q, start + block))
            p = compute_row_probabilities(a, b, rows)                       # [H, R, T_k] float64
            shape = p.shape[:2]
            st = compute_pmax_entropy(p.flatten(0, 1))                      # float64 [H·R] each, on the CPU
            exact = compute_balanced(st.pmax, st.one_minus_pmax).view(shape)
            peaked = (st.pmax >= st.one_minus_pmax).view(shape)             # p_max ≥ ½, or fewer than 2 keys
            paper = compute_theta_paper(p.flatten(0, 1)).view(shape).cpu()
            rest = st.one_minus_pmax                                        # accumulated, no cancellation
            bound = torch.maximum(4.0 * st.pmax * rest, rest * (1.0 + st.pmax)).view(shape)  # §2.4(3), float64
            prefix = compute_prefix_crossing(p, p > 0).cpu()                 # natural key order, float64
            lo = torch.where(peaked, exact, torch.maximum(torch.maximum(prefix, paper), bound))
            hi = torch.where(peaked, exact, 1.0)
            pick = chosen[:, rows] & ~peaked
            if bool(pick.any()):
                iv = compute_theta_interval(p[pick.to(p.device)], top_k=o.top_k, slack=0.0, tol=o.tol)
                lo[pick] = torch.maximum(lo[pick], iv.lo)
                hi[pick] = torch.minimum(hi[pick], iv.hi)
                self.refined_rows += int(pick.sum())
            for name, value in (("lo", lo), ("hi", hi), ("pmax", st.pmax.view(shape)),
                                ("entropy", st.entropy.view(shape)), ("paper", paper)):
                out[name][:, rows] = value
        return out

    def _choose(self, wide: Tensor, n_keys: Tensor) -> Tensor:
        """Wide rows to refine (bool ``[H, T]``): all with ≤ 20 keys, plus up to ``rows_per_head`` others per head."""
        chosen = wide & (n_keys <= EXACT_MAX_KEYS)
        if self.opts.rows_per_head is None:
            return wide
        for h in range(wide.shape[0]):
            idx = torch.nonzero(wide[h] & ~chosen[h]).flatten()
            if idx.numel() > self.opts.rows_per_head:
                idx = idx[torch.randperm(idx.numel(), generator=self.gen)[: self.opts.rows_per_head]]
            chosen[h, idx] = True
        return chosen

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

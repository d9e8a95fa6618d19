"""Per-layer magnitudes of the residual stream and of the norm inputs (THEORY §0.3 per-layer table, §4, §12).

Columns: ``r_resid_max`` / ``r_resid_mean`` (token l2 norm of h_l), ``r_ln_mean`` and ``r2_in`` (mean / max token
l2 norm at the attention input, i.e. N1(h_l) in pre-norm layers), ``r2_ffn_in`` (max at the FFN input) and
``norm1_min_var`` / ``norm2_min_var`` (smallest per-token variance, or mean square for RMSNorm, at each norm input).
All are mergeable across batches: max, min, and sum/count for means.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.model.traces import LayerTrace

NO_INPUT_NORM = ("no norm before the branches in this family: the attention and the FFN read the residual stream "
                 "(THEORY §18.3)")


@dataclass
class _LayerMagnitudes:
    tokens: int = 0
    resid_sum: float = 0.0
    resid_max: float = 0.0
    ln_sum: float = 0.0
    r2_in: float = 0.0
    r2_ffn_in: float = 0.0
    norm1_min_var: float | None = float("inf")   # None where N1 is the identity
    norm2_min_var: float | None = float("inf")   # None where N2 is the identity (no norms before the branches)
    norm1_out_min_var: float | None = None      # branch-output norms (THEORY §18.3); None without them
    norm2_out_min_var: float | None = None


    def merge(self, other: _LayerMagnitudes) -> _LayerMagnitudes:
        """The magnitudes of both inputs' tokens: sums add, maxima and minima combine (None: no such norm)."""
        def least(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        return _LayerMagnitudes(
            self.tokens + other.tokens, self.resid_sum + other.resid_sum, max(self.resid_max, other.resid_max),
            self.ln_sum + other.ln_sum, max(self.r2_in, other.r2_in), max(self.r2_ffn_in, other.r2_ffn_in),
            *(least(getattr(self, f), getattr(other, f)) for f in ("norm1_min_var", "norm2_min_var",
                                                                   "norm1_out_min_var", "norm2_out_min_var")))


@dataclass
class MagnitudePass:
    """Accumulates the magnitude columns per layer from streamed :class:`LayerTrace` objects."""

    name = "magnitudes"
    needs = ()
    layers: dict[int, _LayerMagnitudes] = field(default_factory=dict)

    def observe(self, trace: LayerTrace, ctx: Any = None) -> None:
        acc = self.layers.setdefault(trace.layer, _LayerMagnitudes())
        resid = trace.resid_in.double().norm(dim=-1)                   # [B, T]
        attn_in = trace.attn.x.double().norm(dim=-1)                   # [B, T]
        acc.tokens += resid.numel()
        acc.resid_sum += float(resid.sum())
        acc.resid_max = max(acc.resid_max, float(resid.max()))
        acc.ln_sum += float(attn_in.sum())
        acc.r2_in = max(acc.r2_in, float(attn_in.max()))
        acc.r2_ffn_in = max(acc.r2_ffn_in, float(trace.ffn_in.double().norm(dim=-1).max()))
        n1, n2 = trace.norms["norm_attn"], trace.norms["norm_ffn"]
        acc.norm1_min_var = None if n1.stat is None else min(acc.norm1_min_var, float(n1.stat.min()))
        acc.norm2_min_var = None if n2.stat is None else min(acc.norm2_min_var, float(n2.stat.min()))
        for role, name in (("norm_attn_out", "norm1_out_min_var"), ("norm_ffn_out", "norm2_out_min_var")):
            if role in trace.norms:
                value, seen = float(trace.norms[role].stat.min()), getattr(acc, name)
                setattr(acc, name, value if seen is None else min(seen, value))

    def merge_ranks(self, group: Group) -> None:
        """Every layer's magnitudes merged over the ranks, in rank order."""
        ranks = group.all_gather(self.layers, "the magnitude columns")
        self.layers = {layer: functools.reduce(_LayerMagnitudes.merge, (r[layer] for r in ranks))
                       for layer in sorted(ranks[0])}

    def finish(self, tables: Tables) -> TableParts:
        return TableParts(layers=self.records(), nulls=self.null_reasons())

    def null_reasons(self) -> dict[str, str]:
        """The input-norm columns of a stack whose branches read the residual stream unnormalized (THEORY §18.3)."""
        out = {}
        for column in ("norm1_min_var", "norm2_min_var"):
            if self.layers and all(getattr(a, column) is None for a in self.layers.values()):
                out[column] = NO_INPUT_NORM
        return out

    def records(self) -> list[dict[str, float | int]]:
        """One row per layer with the documented column names."""
        return [
            {"layer": layer, "r_resid_max": a.resid_max, "r_resid_mean": a.resid_sum / a.tokens,
             "r_ln_mean": a.ln_sum / a.tokens, "r2_in": a.r2_in, "r2_ffn_in": a.r2_ffn_in,
             "norm1_min_var": a.norm1_min_var, "norm2_min_var": a.norm2_min_var,
             "norm1_out_min_var": a.norm1_out_min_var, "norm2_out_min_var": a.norm2_out_min_var}
            for layer, a in sorted(self.layers.items())
        ]


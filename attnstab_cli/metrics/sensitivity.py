"""Attention-pathway sensitivity proxy per layer and its log decomposition (THEORY §12).

S_l = 2 s θ̄_l R_l² Π_l with s the softmax scale, θ̄_l the mean over heads of ``theta_mean``, Π_l the full-matrix
projection product and R_l one of two input magnitudes: ``r_resid_mean`` (the residual stream, the paper's reading)
or ``r_ln_mean`` (the normalised attention input, the theorem's quantity). log S splits exactly into
log 2s + log θ̄ + log Π + 2 log R; the terms are reported so ``compare`` can attribute a change between checkpoints.
"""
from __future__ import annotations

import math
from typing import Any

from attnstab_cli.distributed.group import Group
from attnstab_cli.metrics.passes import TableParts, Tables
from attnstab_cli.model.traces import LayerTrace


class SensitivityPass:
    """Records the softmax scale s of every layer (it can vary with depth, e.g. GPT-2's
    scale_attn_by_inverse_layer_idx); the proxy itself is computed from the magnitude, weight and θ columns."""

    name = "sensitivity"
    needs = ("magnitudes", "weights", "theta")

    def __init__(self) -> None:
        self.scales: dict[int, float] = {}

    def observe(self, trace: LayerTrace, ctx: Any = None) -> None:
        self.scales[trace.layer] = float(trace.attn.scale)

    def merge_ranks(self, group: Group) -> None:
        """Nothing to merge: every rank streams every layer, and a layer's scale is a weight fact."""

    def finish(self, tables: Tables) -> TableParts:
        return TableParts(layers=compute_sensitivity(tables.layers, tables.heads, self.scales))


def _log(x: float | None) -> float | None:
    return math.log(x) if x is not None and x > 0 else None


def compute_sensitivity(layers: list[dict[str, Any]], heads: list[dict[str, Any]],
                        scales: dict[int, float]) -> list[dict[str, Any]]:
    """Per-layer records: ``attn_scale``, ``theta_bar``, ``sens_proxy_resid``, ``sens_proxy_ln`` and the log terms
    ``sens_log_theta``, ``sens_log_proj``, ``sens_log_r2_resid``, ``sens_log_r2_ln`` (null where undefined)."""
    out = []
    for rec in layers:
        layer = rec["layer"]
        thetas = [h["theta_mean"] for h in heads if h["layer"] == layer and h["theta_mean"] is not None]
        theta_bar = sum(thetas) / len(thetas) if thetas else None
        s, pi = scales[layer], rec["proj_product_layer"]
        row: dict[str, Any] = {"layer": layer, "attn_scale": s, "theta_bar": theta_bar,
                               "sens_log_theta": _log(theta_bar), "sens_log_proj": _log(pi)}
        for tag, radius in (("resid", rec["r_resid_mean"]), ("ln", rec["r_ln_mean"])):
            row[f"sens_proxy_{tag}"] = None if theta_bar is None else 2.0 * s * theta_bar * radius ** 2 * pi
            row[f"sens_log_r2_{tag}"] = _log(radius ** 2)
        out.append(row)
    return out


def describe_depth_rule(n_layers: int, alpha_geo: list[float], depth_budget: float) -> str:
    """Plain-language reading of the depth rule α = O(N^(-1/4)) (THEORY §10), claiming no more than it proves."""
    lo, hi = min(alpha_geo), max(alpha_geo)
    return (f"depth rule (THEORY §10, k = 4 maps Q, K, V, O): α = Π^¼ per layer is {lo:.3g}–{hi:.3g}; "
            f"N·max Π = {depth_budget:.3g} for N = {n_layers}. The product of (1 + c·Π_l) over layers stays bounded "
            f"when N·Π = O(1), i.e. α = O(N^-1/4); the constant c is unknown, so this is a scale to compare across "
            f"checkpoints and depths, not a pass/fail threshold, and it says nothing about DeepNorm-style scaling "
            f"matching k = 4 exactly (THEORY Errata E7).")

"""Plain-language findings read off a report (issue 5, item 2): which heads, layers and precisions deserve a look.

Each finding states a measured fact and where it is, never a verdict the theory does not support: θ is a sensitivity
factor, not a health score (THEORY §2), and the depth rule has no threshold (Errata E7). Thresholds used here are
named constants so the README can quote them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from attnstab_cli.calibration.shortfall import describe_shortfall
from attnstab_cli.metrics.fragility import RHO_TARGET
from attnstab_cli.report.cells import format_value

N_HEADS_LISTED = 3
DOMINANT_FACTOR = 1.5            # a layer "dominates" when its share of log ∏ bound exceeds 1.5× the mean share
SINK_PARKED = 0.5                # a head "parks" its mass on its sink when the sink takes over half a row, on average
OVERLOAD_FACTOR = 2.0            # an expert is overloaded when its share of token-slots is >= 2x the balanced 1/E
NEAR_SWITCH_MARGIN = 1e-3        # a token this close (selection-score units) to a routing switch sits "near" one
N_EXPERTS_LISTED = 5


@dataclass(frozen=True)
class Finding:
    """One observation: ``kind`` (stable key), ``severity`` (``info`` | ``warn``), the sentence, and where:
    ``items`` lists ``{"layer", "head", "value"}`` for each place it names (head None for a layer)."""

    kind: str
    severity: str
    text: str
    items: tuple[dict[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_findings(manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> list[Finding]:
    """All findings for one report, in display order (a calibration cut short and non-finite values first)."""
    layers, heads = tables.get("layers") or [], tables.get("heads") or []
    out = _short_calibration(manifest) + _non_finite(tables)
    if manifest.get("calibration") is not None and heads:
        out += _lowest_theta(heads) + _widest_intervals(heads, manifest) + _sink_parked(heads)
    out += _dominant_bound(layers)
    out += _local_and_global(layers)
    out += _no_magnitude_barrier(manifest, layers)
    out += _low_precision(layers)
    out += _gradient(layers)
    out += _experts(tables.get("experts") or []) + _near_switch(layers)
    return out


def _expert_item(row: dict[str, Any]) -> dict[str, Any]:
    return {"layer": row["layer"], "head": None, "expert": row["expert"], "value": row["load_share"]}


def _experts(experts: list[dict[str, Any]]) -> list[Finding]:
    """Mixture-of-experts layers (THEORY §18.7): experts no calibration token reached (dead on this text) and experts
    carrying at least OVERLOAD_FACTOR times the balanced share of token-slots."""
    out = []
    dead = [r for r in experts if r.get("token_slots") == 0]
    if dead:
        names = ", ".join(f"L{r['layer']}E{r['expert']}" for r in dead[:N_EXPERTS_LISTED])
        more = f" and {len(dead) - N_EXPERTS_LISTED} more" if len(dead) > N_EXPERTS_LISTED else ""
        out.append(Finding("dead_experts", "warn", f"{len(dead)} experts received no token on the calibration text "
                           f"({names}{more}); their bounds were never exercised", tuple(map(_expert_item, dead))))
    per_layer: dict[int, int] = {}
    for r in experts:
        per_layer[r["layer"]] = per_layer.get(r["layer"], 0) + 1
    heavy = sorted((r for r in experts if r.get("load_share") is not None
                    and r["load_share"] >= OVERLOAD_FACTOR / per_layer[r["layer"]]), key=lambda r: -r["load_share"])
    if heavy:
        text = (f"overloaded experts (share of token-slots >= {OVERLOAD_FACTOR:g}x the balanced 1/E): "
                + ", ".join(f"L{r['layer']}E{r['expert']} {r['load_share']:.0%} (1/E = {1 / per_layer[r['layer']]:.0%})"
                            for r in heavy[:N_EXPERTS_LISTED]))
        out.append(Finding("overloaded_experts", "info", text, tuple(map(_expert_item, heavy))))
    return out


def _near_switch(layers: list[dict[str, Any]]) -> list[Finding]:
    """MoE layers with calibration tokens within NEAR_SWITCH_MARGIN of a routing switch: the bounds hold inside a
    routing region only, and for those tokens the region ends that close (THEORY §18.7)."""
    near = sorted((r for r in layers if r.get("router_margin_min") is not None
                   and r["router_margin_min"] < NEAR_SWITCH_MARGIN), key=lambda r: r["router_margin_min"])
    if not near:
        return []
    text = (f"routing near a switch (router_margin_min < {NEAR_SWITCH_MARGIN:g} in selection-score units): "
            + ", ".join(f"layer {r['layer']} {r['router_margin_min']:.2g} (p05 "
                        f"{format_value(r.get('router_margin_p05'), '.2g')})" for r in near)
            + "; the layer bounds hold inside a routing region, which ends that close for some tokens")
    return [Finding("near_switch", "info", text, tuple(_item(r["layer"], None, r["router_margin_min"]) for r in near))]


def _short_calibration(manifest: dict[str, Any]) -> list[Finding]:
    """Fewer sequences scanned than asked for (the calibration text ran out): every number rests on less text."""
    cal = manifest.get("calibration") or {}
    text = describe_shortfall(cal.get("source", "the calibration"), cal.get("n_sequences", 0),
                              cal.get("n_sequences_requested"), cal.get("seq_len", 0)) if cal else None
    return [] if text is None else [Finding("short_calibration", "warn", text)]


def _non_finite(tables: dict[str, list[dict[str, Any]]]) -> list[Finding]:
    out = []
    for name, rows in tables.items():
        bad = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
        if bad:
            out.append(Finding("non_finite", "warn", f"{name}: non-finite values in {', '.join(bad)}",
                               tuple({"column": k} for k in bad)))
    return out


def _item(layer: int | None, head: int | None, value: float | None) -> dict[str, Any]:
    return {"layer": layer, "head": head, "value": value}


def _lowest_theta(heads: list[dict[str, Any]]) -> list[Finding]:
    rated = sorted((r for r in heads if r.get("theta_mean") is not None), key=lambda r: r["theta_mean"])
    low = rated[:N_HEADS_LISTED]
    if not low:
        return []
    text = "lowest mean θ: " + ", ".join(f"L{r['layer']}H{r['head']} {r['theta_mean']:.3f} (p05 "
                                         f"{format_value(r.get('theta_p05'), '.3f')}, "
                                         f"p_max {format_value(r.get('pmax_mean'), '.2f')})" for r in low)
    return [Finding("lowest_theta", "info", text, tuple(_item(r["layer"], r["head"], r["theta_mean"]) for r in low))]


def _widest_intervals(heads: list[dict[str, Any]], manifest: dict[str, Any]) -> list[Finding]:
    tol = ((manifest.get("run") or {}).get("theta") or {}).get("tol") or 0.0
    wide = sorted((r for r in heads if (r.get("theta_wide_rows") or 0) > 0),
                  key=lambda r: -(r.get("theta_width_max") or 0.0))[:N_HEADS_LISTED]
    if not wide:
        return [Finding("widest_interval", "info", f"every θ interval is within {tol:g} (plus the rounding slack)")]
    text = (f"widest θ intervals (rows wider than {tol:g}): "
            + ", ".join(f"L{r['layer']}H{r['head']} {format_value(r.get('theta_width_max'), '.1e')} "
                        f"({r['theta_wide_rows']} rows)" for r in wide) + "; --theta-rows all refines every row")
    return [Finding("widest_interval", "info", text,
                    tuple(_item(r["layer"], r["head"], r["theta_width_max"]) for r in wide))]


def _sink_parked(heads: list[dict[str, Any]]) -> list[Finding]:
    """Heads whose sink logit takes most of each row (THEORY §18.4): ``sink_mass_mean`` above :data:`SINK_PARKED`.
    Such a head mixes little of its values into the stream, and its θ_sink ≤ m is small for that reason, not
    because its rows are peaked. Nothing is said for a model without sinks."""
    with_sink = [r for r in heads if r.get("sink_mass_mean") is not None]
    if not with_sink:
        return []
    parked = sorted((r for r in with_sink if r["sink_mass_mean"] > SINK_PARKED), key=lambda r: -r["sink_mass_mean"])
    if not parked:
        top = max(with_sink, key=lambda r: r["sink_mass_mean"])
        return [Finding("sink_parked", "info", f"no head gives its sink more than {SINK_PARKED:.0%} of a row on "
                                               f"average (largest: L{top['layer']}H{top['head']} "
                                               f"{top['sink_mass_mean']:.2f})")]
    listed = parked[:N_HEADS_LISTED]
    text = (f"{len(parked)} of {len(with_sink)} heads park most of their attention on the sink (mean sink mass > "
            f"{SINK_PARKED:.0%}): " + ", ".join(f"L{r['layer']}H{r['head']} {r['sink_mass_mean']:.2f}" for r in listed)
            + (" …" if len(parked) > len(listed) else ""))
    return [Finding("sink_parked", "info", text, tuple(_item(r["layer"], r["head"], r["sink_mass_mean"])
                                                       for r in parked))]


def _dominant_bound(layers: list[dict[str, Any]]) -> list[Finding]:
    """Layers carrying an outsized share of log ∏_l (tier-2 bound, else tier 1): where the end-to-end bound grows."""
    col = "lip_layer_calibrated" if any(r.get("lip_layer_calibrated") for r in layers) else "lip_layer_weights"
    logs = [(r["layer"], math.log(r[col])) for r in layers if r.get(col) and r[col] > 0 and math.isfinite(r[col])]
    total = sum(v for _, v in logs if v > 0)
    tier = "tier-2" if col == "lip_layer_calibrated" else "tier-1"
    if not logs:
        return []
    if total <= 0:
        return [Finding("dominant_bound", "info", f"every layer's {tier} bound is ≤ 1: the end-to-end bound does "
                                                  "not grow with depth")]
    ranked = sorted(logs, key=lambda x: -x[1])
    top = [(layer, v / total) for layer, v in ranked if v / total >= DOMINANT_FACTOR / len(logs)] or \
        [(ranked[0][0], ranked[0][1] / total)]
    text = (f"share of log ∏ {tier} bound (log {total:.3g}): "
            + ", ".join(f"layer {layer} {share:.0%}" for layer, share in top)
            + (f" (mean share {1 / len(logs):.0%})" if len(logs) > 1 else ""))
    return [Finding("dominant_bound", "info", text, tuple(_item(layer, None, share) for layer, share in top))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _local_and_global(layers: list[dict[str, Any]]) -> list[Finding]:
    """Models that alternate windowed (local) and global layers (THEORY §18.6): the two kinds side by side, since a
    local layer's θ rows see at most its window's keys and its bounds are not comparable with a global layer's."""
    local = [r for r in layers if r.get("attn_window") is not None]
    full = [r for r in layers if r.get("attn_window") is None]
    if not local or not full:
        return []
    parts = []
    for name, group in (("local", local), ("global", full)):
        theta = _mean([r["theta_bar"] for r in group if r.get("theta_bar") is not None])
        bound = [r["lip_layer_calibrated"] for r in group if r.get("lip_layer_calibrated") is not None]
        windows = sorted({r["attn_window"] for r in group if r.get("attn_window") is not None})
        parts.append(f"{len(group)} {name} layers" + (f" (window {', '.join(map(str, windows))})" if windows else "")
                     + f": mean θ̄ {format_value(theta, '.3f')}"
                     + (f", largest tier-2 bound {format_value(max(bound))}" if bound else ""))
    return [Finding("local_global", "info", "; ".join(parts),
                    tuple(_item(r["layer"], None, r.get("attn_window")) for r in local))]


def _no_magnitude_barrier(manifest: dict[str, Any], layers: list[dict[str, Any]]) -> list[Finding]:
    """A family whose attention reads the residual stream unnormalized (THEORY §18.3): no norm resets the MHA input,
    so Lemma 3.3's magnitude barrier is absent and the tier-1 radius ``r2_in_reset`` grows with depth."""
    if (manifest.get("checkpoint") or {}).get("attn_input_normalized") is not False:
        return []
    radii = [(r["layer"], r["r2_in_reset"]) for r in layers if r.get("r2_in_reset") is not None]
    text = ("no norm before the attention: the MHA reads the residual stream, so no structural magnitude barrier "
            "bounds its input (Lemma 3.3 does not apply, THEORY §18.3)")
    ends = [radii[0], radii[-1]] if len(radii) >= 2 else radii
    if len(ends) == 2:
        (l0, first), (ln, last) = ends
        text += (f"; the tier-1 radius r2_in_reset grows with depth, from {format_value(first)} at layer {l0} to "
                 f"{format_value(last)} at layer {ln}")
    return [Finding("no_magnitude_barrier", "info", text, tuple(_item(layer, None, r) for layer, r in ends))]


def _low_precision(layers: list[dict[str, Any]]) -> list[Finding]:
    out = []
    for prec in ("bf16", "fp16"):
        hit = [r for r in layers if (r.get(f"rho_ln_{prec}") or 0.0) > RHO_TARGET]
        if not hit:
            continue
        worst = max(hit, key=lambda r: r[f"rho_ln_{prec}"])
        text = (f"{prec}: ρ_LN > {RHO_TARGET} in {len(hit)} of {len(layers)} layers (worst: layer {worst['layer']}, "
                f"{worst[f'rho_ln_{prec}']:.3g}); norm inputs lose precision in {prec} (THEORY §13)")
        out.append(Finding("low_precision", "warn", text,
                           tuple(_item(r["layer"], None, r[f"rho_ln_{prec}"]) for r in hit)))
    return out


def _gradient(layers: list[dict[str, Any]]) -> list[Finding]:
    g = [(r["layer"], r["grad_h_in"]) for r in layers if r.get("grad_h_in")]
    if len(g) < 2:
        return []
    (l0, first), (ln, last) = g[0], g[-1]
    ratio = first / last
    text = (f"‖∂L/∂h‖ at layer {l0} is {ratio:.3g}× that at layer {ln} "
            f"({'grows' if ratio > 1 else 'shrinks'} towards the input)")
    return [Finding("gradient_profile", "info", text, (_item(l0, None, first), _item(ln, None, last)))]

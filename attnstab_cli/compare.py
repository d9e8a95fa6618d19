"""Two reports side by side: per-layer deltas and the attribution of the sensitivity change (THEORY §12).

Δlog S_ℓ = Δlog θ̄_ℓ + Δlog Π_ℓ + 2Δlog R_ℓ (+ Δlog 2s when the scale differs) exactly, from the log terms each scan
reports; shares of the total are given only when |Δlog S| > 1e-3. Reports are compared only when their calibration
tokens are identical (same token hash) unless the caller allows otherwise.
"""
from __future__ import annotations

import math
from typing import Any

from attnstab_cli.errors import UsageError
from attnstab_cli.report.read import Report

SHARE_MIN = 1e-3
SIDE_BY_SIDE = ("theta_bar", "proj_product_layer", "r_resid_mean", "r_ln_mean", "sens_proxy_ln",
                "lip_layer_calibrated", "grad_h_in")


def _dlog(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a <= 0 or b <= 0 else math.log(b) - math.log(a)


def compare_layers(a: Report, b: Report) -> list[dict[str, Any]]:
    """Per shared layer: both sides of SIDE_BY_SIDE and the attribution of Δlog sens_proxy_* (B relative to A)."""
    by_layer = {r["layer"]: r for r in b.layers}
    out = []
    for ra in a.layers:
        rb = by_layer.get(ra["layer"])
        if rb is None:
            continue
        row: dict[str, Any] = {"layer": ra["layer"]}
        for col in SIDE_BY_SIDE:
            row[f"{col}_a"], row[f"{col}_b"] = ra.get(col), rb.get(col)
        row["dlog_theta"] = _diff(ra, rb, "sens_log_theta")
        row["dlog_proj"] = _diff(ra, rb, "sens_log_proj")
        row["dlog_scale"] = _dlog(ra.get("attn_scale"), rb.get("attn_scale"))
        for tag in ("resid", "ln"):
            row[f"dlog_r_{tag}"] = None if _diff(ra, rb, f"sens_log_r2_{tag}") is None \
                else _diff(ra, rb, f"sens_log_r2_{tag}") / 2.0
            row[f"dlog_sens_{tag}"] = _dlog(ra.get(f"sens_proxy_{tag}"), rb.get(f"sens_proxy_{tag}"))
        total = row["dlog_sens_ln"]
        for term in ("theta", "proj"):
            row[f"share_{term}_ln"] = (row[f"dlog_{term}"] / total if total is not None and row[f"dlog_{term}"]
                                       is not None and abs(total) > SHARE_MIN else None)
        row["share_r_ln"] = (2.0 * row["dlog_r_ln"] / total if total is not None and row["dlog_r_ln"] is not None
                             and abs(total) > SHARE_MIN else None)
        out.append(row)
    return out


def _diff(ra: dict[str, Any], rb: dict[str, Any], col: str) -> float | None:
    return None if ra.get(col) is None or rb.get(col) is None else rb[col] - ra[col]


def check_comparable(a: Report, b: Report, allow_different_calibration: bool) -> list[str]:
    """Refuse reports scanned on different tokens (unless allowed); return notes on what differs."""
    ca, cb = a.manifest.get("calibration"), b.manifest.get("calibration")
    if ca is None or cb is None:
        raise UsageError("a weights-only report has no calibration: compare needs two calibrated scans")
    notes = []
    if ca["token_sha256"] != cb["token_sha256"]:
        if not allow_different_calibration:
            raise UsageError("the reports were scanned on different calibration tokens "
                             f"({ca['token_sha256'][:12]} vs {cb['token_sha256'][:12]})",
                             hint="rescan with the same --tokens, or pass --allow-different-calibration")
        notes.append("calibration tokens differ: deltas mix model and data changes")
    la, lb = len(a.layers), len(b.layers)
    if la != lb:
        notes.append(f"A has {la} layers, B has {lb}: comparing the {min(la, lb)} both share")
    return notes

"""Two reports side by side: per-layer and per-head deltas and the attribution of the sensitivity change (THEORY §12).

Δlog S_ℓ = Δlog θ̄_ℓ + Δlog Π_ℓ + 2Δlog R_ℓ (+ Δlog 2s when the scale differs) exactly, from the log terms each scan
reports; shares of the total are given only when |Δlog S| > 1e-3. Per head the same split without R (heads share the
layer's input): Δlog(θ_h Π_h) = Δlog θ_h + Δlog Π_h with Π_h the head's projection-norm product. Reports are compared
only when their calibration tokens are identical (same token hash) unless the caller allows otherwise; layers are
aligned by index (the first min(N_A, N_B)), heads only when both models have the same number per layer. The routing
columns of mixture-of-experts layers are side by side too (null for dense layers), and when both reports hold an
experts table (THEORY §18.7) each (layer, expert) both have is compared: its weight norms, ball bound and load share.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from attnstab_cli.errors import UsageError
from attnstab_cli.report.destination import COMPARE_KIND
from attnstab_cli.report.same_tokens import check_same_tokens
from attnstab_cli.report.read import Report
from attnstab_cli.report.schema import ALL_TABLES
from attnstab_cli.report.write import publish_directory

SHARE_MIN = 1e-3
MOE_SIDE_BY_SIDE = ("router_margin_min", "router_margin_p05", "expert_load_max", "expert_load_cv",
                    "router_entropy_mean", "gate_theta_mean")
SIDE_BY_SIDE = ("theta_bar", "proj_product_layer", "r_resid_mean", "r_ln_mean", "sens_proxy_ln",
                "lip_layer_calibrated", "grad_h_in", *MOE_SIDE_BY_SIDE)
EXPERT_METRICS = ("gate_norm", "up_norm", "out_norm", "lip_expert_weights", "load_share")
HEAD_METRICS = ("theta_mean", "theta_p05", "pmax_mean", "entropy_mean", "proj_product")
_DLOG_LAYER = {
    "dlog_theta": "Δlog theta_bar (B − A)", "dlog_proj": "Δlog proj_product_layer",
    "dlog_scale": "Δlog attn_scale (0 unless the softmax scale changed)",
    "dlog_r_resid": "Δlog r_resid_mean", "dlog_r_ln": "Δlog r_ln_mean",
    "dlog_sens_resid": "Δlog sens_proxy_resid = dlog_theta + dlog_proj + 2 dlog_r_resid + dlog_scale",
    "dlog_sens_ln": "Δlog sens_proxy_ln = dlog_theta + dlog_proj + 2 dlog_r_ln + dlog_scale",
    "share_theta_ln": "dlog_theta / dlog_sens_ln (null when |dlog_sens_ln| <= 1e-3)",
    "share_proj_ln": "dlog_proj / dlog_sens_ln (null when |dlog_sens_ln| <= 1e-3)",
    "share_r_ln": "2 dlog_r_ln / dlog_sens_ln (null when |dlog_sens_ln| <= 1e-3)",
}
_DLOG_HEAD = {"dlog_theta": "Δlog theta_mean (B − A)", "dlog_proj": "Δlog proj_product (the head's Π_h)",
              "dlog_theta_proj": "Δlog(theta_mean proj_product) = dlog_theta + dlog_proj"}


_LOSS_FIELDS = {
    "dw_norm": ("param", "||w_B - w_A|| over the block"),
    "first_order": ("loss", "g_A . dw restricted to the block"),
    "second_order": ("loss", "dw_b . (g_A + H_A dw / 2)_b: the block's share of the expansion at A"),
    "symmetric": ("loss", "dw_b . ((g_A + g_B) / 2 + (H_A dw - H_B dw) / 12)_b: the block's share of the corrected "
                          "trapezoid rule"),
}
LOSS_SCHEMA = pa.schema(
    [pa.field("layer", pa.int64(), metadata={"unit": "index", "description": "0-based layer index"}),
     pa.field("block", pa.string(), metadata={"unit": "text", "description": "parameter block"})]
    + [pa.field(k, pa.float64(), metadata={"unit": u, "description": d}) for k, (u, d) in _LOSS_FIELDS.items()],
    metadata={"kind": COMPARE_KIND, "table": "loss"})


@dataclass
class Comparison:
    """The aligned rows (B relative to A), who A and B are, and what could not be aligned."""

    a: dict[str, Any]
    b: dict[str, Any]
    layers: list[dict[str, Any]]
    heads: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    experts: list[dict[str, Any]] | None = None          # both reports hold an experts table: per (layer, expert)
    loss_blocks: list[dict[str, Any]] | None = None      # compare --loss: the Taylor terms per (layer, block)
    loss_totals: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out = {"kind": COMPARE_KIND, "a": self.a, "b": self.b, "notes": self.notes, "layers": self.layers,
               "heads": self.heads}
        if self.experts is not None:
            out["experts"] = self.experts
        if self.loss_totals is not None:
            out["loss"] = {"totals": self.loss_totals, "blocks": self.loss_blocks}
        return out


def _dlog(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or a <= 0 or b <= 0 else math.log(b) - math.log(a)


def _diff(ra: dict[str, Any], rb: dict[str, Any], col: str) -> float | None:
    return None if ra.get(col) is None or rb.get(col) is None else rb[col] - ra[col]


def _sides(row: dict[str, Any], ra: dict[str, Any], rb: dict[str, Any], metrics: tuple[str, ...]) -> None:
    for col in metrics:
        row[f"{col}_a"], row[f"{col}_b"], row[f"{col}_delta"] = ra.get(col), rb.get(col), _diff(ra, rb, col)


def compare_layers(a: Report, b: Report) -> list[dict[str, Any]]:
    """Per shared layer: both sides and the delta of SIDE_BY_SIDE, and the attribution of Δlog sens_proxy_*."""
    by_layer = {r["layer"]: r for r in b.layers}
    out = []
    for ra in a.layers:
        rb = by_layer.get(ra["layer"])
        if rb is None:
            continue
        row: dict[str, Any] = {"layer": ra["layer"]}
        _sides(row, ra, rb, SIDE_BY_SIDE)
        row["dlog_theta"] = _diff(ra, rb, "sens_log_theta")
        row["dlog_proj"] = _diff(ra, rb, "sens_log_proj")
        row["dlog_scale"] = _dlog(ra.get("attn_scale"), rb.get("attn_scale"))
        for tag in ("resid", "ln"):
            d2 = _diff(ra, rb, f"sens_log_r2_{tag}")
            row[f"dlog_r_{tag}"] = None if d2 is None else d2 / 2.0
            row[f"dlog_sens_{tag}"] = _dlog(ra.get(f"sens_proxy_{tag}"), rb.get(f"sens_proxy_{tag}"))
        total = row["dlog_sens_ln"]
        big = total is not None and abs(total) > SHARE_MIN
        for term in ("theta", "proj"):
            row[f"share_{term}_ln"] = row[f"dlog_{term}"] / total if big and row[f"dlog_{term}"] is not None else None
        row["share_r_ln"] = 2.0 * row["dlog_r_ln"] / total if big and row["dlog_r_ln"] is not None else None
        out.append(row)
    return out


def compare_heads(a: Report, b: Report) -> list[dict[str, Any]]:
    """Per (layer, head) both models have: HEAD_METRICS on both sides, deltas and the head-level log split."""
    by_key = {(r["layer"], r["head"]): r for r in b.heads}
    out = []
    for ra in a.heads:
        rb = by_key.get((ra["layer"], ra["head"]))
        if rb is None:
            continue
        row: dict[str, Any] = {"layer": ra["layer"], "head": ra["head"]}
        _sides(row, ra, rb, HEAD_METRICS)
        row["dlog_theta"] = _dlog(ra.get("theta_mean"), rb.get("theta_mean"))
        row["dlog_proj"] = _dlog(ra.get("proj_product"), rb.get("proj_product"))
        row["dlog_theta_proj"] = None if row["dlog_theta"] is None or row["dlog_proj"] is None \
            else row["dlog_theta"] + row["dlog_proj"]
        out.append(row)
    return out


def compare_experts(a: Report, b: Report) -> list[dict[str, Any]] | None:
    """Per (layer, expert) both experts tables hold: EXPERT_METRICS on both sides and their deltas; None unless both
    reports have an experts table."""
    ea, eb = a.tables.get("experts"), b.tables.get("experts")
    if ea is None or eb is None:
        return None
    by_key = {(r["layer"], r["expert"]): r for r in eb}
    out = []
    for ra in ea:
        rb = by_key.get((ra["layer"], ra["expert"]))
        if rb is not None:
            row: dict[str, Any] = {"layer": ra["layer"], "expert": ra["expert"]}
            _sides(row, ra, rb, EXPERT_METRICS)
            out.append(row)
    return out


def check_comparable(a: Report, b: Report, allow_different_calibration: bool) -> list[str]:
    """Refuse reports scanned on different tokens (unless allowed); return notes on what differs."""
    ca, cb = a.manifest.get("calibration"), b.manifest.get("calibration")
    if ca is None or cb is None:
        raise UsageError("a weights-only report has no calibration: compare needs two calibrated scans")
    notes = check_same_tokens(a, b, allow_different_calibration)
    la, lb = len(a.layers), len(b.layers)
    if la != lb:
        notes.append(f"A has {la} layers, B has {lb}: comparing the {min(la, lb)} both share")
    return notes


def _identity(report: Report, label: str) -> dict[str, Any]:
    ck, cal = report.manifest["checkpoint"], report.manifest.get("calibration") or {}
    return {"label": label, "checkpoint": ck.get("checkpoint"), "family": ck.get("family"),
            "fingerprint": ck.get("fingerprint"), "n_layers": ck.get("n_layers"), "n_heads": ck.get("n_heads"),
            "token_sha256": cal.get("token_sha256")}


def compare_reports(a: Report, b: Report, allow_different_calibration: bool = False,
                    labels: tuple[str, str] = ("A", "B")) -> Comparison:
    """Align ``a`` and ``b`` and compute every delta (B relative to A); heads only when their counts agree."""
    notes = check_comparable(a, b, allow_different_calibration)
    ha, hb = a.manifest["checkpoint"].get("n_heads"), b.manifest["checkpoint"].get("n_heads")
    if ha != hb:
        notes.append(f"A has {ha} heads per layer, B has {hb}: heads are not aligned, comparing per layer only")
        heads: list[dict[str, Any]] = []
    else:
        heads = compare_heads(a, b)
    experts = compare_experts(a, b)
    if (a.tables.get("experts") is None) != (b.tables.get("experts") is None):
        notes.append(f"only {labels[0] if a.tables.get('experts') is not None else labels[1]} has an experts table "
                     "(mixture-of-experts layers): experts are not compared")
    return Comparison(_identity(a, labels[0]), _identity(b, labels[1]), compare_layers(a, b), heads, notes,
                      experts)


def _schema(grain: str, metrics: tuple[str, ...], dlogs: dict[str, str]) -> pa.Schema:
    """Arrow schema of a comparison table: keys, each metric's A/B/delta (described from the report schema), dlogs."""
    described = {c.name: c for c in ALL_TABLES[grain]}
    fields = [pa.field("layer", pa.int64(), metadata={"unit": "index", "description": "0-based layer index"})]
    if grain == "heads":
        fields.append(pa.field("head", pa.int64(), metadata={"unit": "index", "description": "query head"}))
    if grain == "experts":
        fields.append(pa.field("expert", pa.int64(), metadata={"unit": "index", "description": "routed expert"}))
    for m in metrics:
        unit, desc = described[m].unit, described[m].description
        for side, what in (("a", "in A"), ("b", "in B"), ("delta", "B − A")):
            fields.append(pa.field(f"{m}_{side}", pa.float64(), metadata={"unit": unit, "description":
                                                                          f"{m} {what}: {desc}"}))
    fields += [pa.field(k, pa.float64(), metadata={"unit": "log" if k.startswith("dlog") else "fraction",
                                                   "description": v}) for k, v in dlogs.items()]
    return pa.schema(fields, metadata={"kind": COMPARE_KIND, "table": grain})


def write_comparison(out: Path, comp: Comparison, force: bool = False) -> Path:
    """``layers.parquet``, ``heads.parquet``, ``experts.parquet`` (when both reports have experts) and
    ``compare.json`` (kind, A, B, notes) under ``out``, atomically."""
    grains = [("layers", comp.layers, SIDE_BY_SIDE, _DLOG_LAYER), ("heads", comp.heads, HEAD_METRICS, _DLOG_HEAD)]
    if comp.experts is not None:
        grains.append(("experts", comp.experts, EXPERT_METRICS, {}))

    def fill(staging: Path) -> None:
        for grain, rows, metrics, dlogs in grains:
            schema = _schema(grain, metrics, dlogs)
            pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema),
                           staging / f"{grain}.parquet")
        if comp.loss_blocks is not None:
            pq.write_table(pa.Table.from_pylist(comp.loss_blocks, schema=LOSS_SCHEMA), staging / "loss.parquet")
        meta = {k: v for k, v in comp.as_json().items() if k not in ("layers", "heads", "experts")}
        if "loss" in meta:
            meta["loss"] = {"totals": meta["loss"]["totals"]}
        (staging / "compare.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return publish_directory(out, fill, force, kind="compare")

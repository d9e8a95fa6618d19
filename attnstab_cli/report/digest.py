"""The summary of a report as plain data, so the terminal, JSON and Markdown views show the same content.

Model line, calibration line, one per-layer table (θ, p_max, input magnitudes, projection-norm product, the three
bound tiers, the gradient norm when measured), the layers × heads θ matrix and the findings (``findings.py``).
"""
from __future__ import annotations

from typing import Any

from attnstab_cli.report.cells import MISSING
from attnstab_cli.report.findings import compute_findings

# per-layer table: report column -> heading (columns absent from a report are dropped, e.g. grad without --grad)
LAYER_COLUMNS = {
    "theta_bar": "θ̄", "pmax_mean": "p_max", "r_resid_mean": "|h|", "r_ln_mean": "R", "proj_product_layer": "Π",
    "lip_layer_weights": "tier 1", "lip_layer_calibrated": "tier 2", "lip_layer_empirical": "tier 3",
    "grad_h_in": "‖∂L/∂h‖",
}
COLUMN_NOTES = {
    "θ̄": "mean θ over heads", "p_max": "mean over heads of mean p_max", "|h|": "mean token norm of the residual stream",
    "R": "mean token norm at the attention input", "Π": "‖W_Q‖‖W_K‖‖W_V‖‖W_O‖",
    "tier 1": "Lipschitz bound from the weights", "tier 2": "bound at the calibration text (worst sequence)",
    "tier 3": "certified lower bound (empirical)", "‖∂L/∂h‖": "gradient norm entering the layer (--grad)",
}


def describe_model(manifest: dict[str, Any]) -> str:
    ck = manifest.get("checkpoint") or {}
    get = {k: MISSING if ck.get(k) is None else ck[k] for k in (
        "checkpoint", "family", "n_layers", "d_model", "n_heads", "n_kv_heads", "norm", "placement")}
    fp = ck.get("fingerprint")
    return (f"{get['checkpoint']}  {get['family']}  {get['n_layers']} layers  d={get['d_model']}  "
            f"heads={get['n_heads']}/{get['n_kv_heads']}  {get['norm']} {get['placement']}"
            + (f"  weights {fp.split(':')[-1][:12]}" if fp else "")
            + "".join(f"  ({part} not analysed: {n} tensors)" for part, n in (ck.get("ignored_parts") or {}).items()))


def describe_calibration(manifest: dict[str, Any]) -> str:
    cal = manifest.get("calibration")
    if cal is None:
        return "weights only: no calibration text"
    run = manifest.get("run") or {}
    get = {k: MISSING if cal.get(k) is None else cal[k] for k in ("source", "n_sequences", "seq_len", "seed")}
    requested, scanned = cal.get("n_sequences_requested"), cal.get("n_sequences")
    asked = f" (of {requested} asked for)" if None not in (requested, scanned) and requested > scanned else ""
    return (f"calibration: {get['source']}  {get['n_sequences']} x {get['seq_len']} tokens{asked}  "
            f"ids {str(cal.get('token_sha256') or MISSING)[:12]}  seed {get['seed']}  "
            f"{run.get('device') or MISSING} {run.get('dtype') or MISSING}")


def compute_layer_rows(tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The per-layer table: LAYER_COLUMNS of each layer, with p_max averaged over the layer's heads."""
    pmax: dict[int, list[float]] = {}
    for h in tables.get("heads") or []:
        if h.get("pmax_mean") is not None:
            pmax.setdefault(h["layer"], []).append(h["pmax_mean"])
    rows = []
    for r in tables.get("layers") or []:
        vals = pmax.get(r["layer"])
        mean_pmax = sum(vals) / len(vals) if vals else None
        rows.append({"layer": r["layer"], **{c: mean_pmax if c == "pmax_mean" else r.get(c) for c in LAYER_COLUMNS}})
    present = [c for c in LAYER_COLUMNS if any(r[c] is not None for r in rows)]
    return [{"layer": r["layer"], **{c: r[c] for c in present}} for r in rows]


def compute_theta_matrix(heads: list[dict[str, Any]], column: str = "theta_mean") -> list[list[float | None]]:
    """``column`` as a layers × heads matrix (rows in layer order; None where a head has no value)."""
    if not heads:
        return []
    n_layers, n_heads = 1 + max(r["layer"] for r in heads), 1 + max(r["head"] for r in heads)
    grid: list[list[float | None]] = [[None] * n_heads for _ in range(n_layers)]
    for r in heads:
        grid[r["layer"]][r["head"]] = r.get(column)
    return grid


def theta_note(manifest: dict[str, Any], heads: list[dict[str, Any]]) -> str | None:
    """How the θ intervals were certified and how many rows stayed wide."""
    if manifest.get("calibration") is None or not heads:
        return None
    theta = (manifest.get("run") or {}).get("theta") or {}
    wide = sum(r.get("theta_wide_rows") or 0 for r in heads)
    unrefined = theta.get("unrefined_rows", 0)
    return (f"θ: a certified interval for every row (slack {theta.get('slack')}); {theta.get('refined_rows', 0)} rows "
            f"refined by A1 or A2+A3; {wide} rows still wider than {theta.get('tol')}"
            + (f", {unrefined} of them beyond --theta-rows" if unrefined else ""))


def compute_curvature_rows(curvature: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer, the sharpest block (largest lambda_max) and the layer's total trace; the model row last."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for r in curvature:
        if r["layer"] is not None:
            by_layer.setdefault(r["layer"], []).append(r)
    rows = []
    for layer, blocks in sorted(by_layer.items()):
        measured = [r for r in blocks if r.get("lambda_max") is not None]
        top = max(measured, key=lambda r: r["lambda_max"]) if measured else None
        rows.append({"layer": layer, "sharpest_block": None if top is None else top["block"],
                     "lambda_max": None if top is None else top["lambda_max"],
                     "trace_est": _total(r.get("trace_est") for r in blocks),
                     "trace_se": _root_sum_square(r.get("trace_se") for r in blocks),
                     "grad_norm": _root_sum_square(r.get("grad_norm") for r in blocks),
                     "converged": None if any(r.get("converged") is None for r in blocks) else
                     all(r["converged"] for r in blocks)})
    model = next((r for r in curvature if r["layer"] is None), None)
    if model is not None:
        rows.append({"layer": None, "sharpest_block": "model", **{k: model.get(k) for k in (
            "lambda_max", "trace_est", "trace_se", "grad_norm", "converged")}})
    return rows


def _total(values: Any) -> float | None:
    """Sum over a layer's blocks; None when any block has no value (a partial sum would understate it)."""
    items = list(values)
    return None if not items or any(v is None for v in items) else sum(items)


def _root_sum_square(values: Any) -> float | None:
    total = _total(None if v is None else v * v for v in values)
    return None if total is None else total ** 0.5


def build_digest(manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Everything the summary shows, as JSON-ready data."""
    heads = tables.get("heads") or []
    calibrated = manifest.get("calibration") is not None
    model = (tables.get("model") or [{}])[0]
    return {
        "model": describe_model(manifest),
        "calibration": describe_calibration(manifest),
        "layer_columns": {c: LAYER_COLUMNS[c] for c in (compute_layer_rows(tables) or [{}])[0] if c != "layer"},
        "layers": compute_layer_rows(tables),
        "theta_mean": compute_theta_matrix(heads) if calibrated else [],
        "bound_product": {k: model.get(k) for k in ("log_lip_model_weights", "log_lip_model_calibrated")},
        "grad": None if model.get("grad_loss_kind") is None else {
            "loss_kind": model["grad_loss_kind"], "loss": model.get("grad_loss"),
            "identity_path": model.get("identity_grad_path")},
        "theta_note": theta_note(manifest, heads),
        "findings": [f.as_dict() for f in compute_findings(manifest, tables)],
        "curvature": compute_curvature_rows(tables.get("curvature") or []),
    }

"""The summary as GitHub-flavoured Markdown, for CI job summaries (``--format markdown``; same digest as the terminal)."""
from __future__ import annotations

from typing import Any

from attnstab_cli.report.cells import MISSING, format_value
from attnstab_cli.report.digest import COLUMN_NOTES, build_digest

_BAND_MARKS = ((0.25, "🟥"), (0.5, "🟧"), (0.75, "🟨"), (0.95, "🟩"), (2.0, "🟢"))


def _cell(x: Any) -> str:
    """A table cell: pipes escaped (``|h|`` would otherwise split the cell)."""
    text = MISSING if x is None else format(x, ".4g") if isinstance(x, float) else str(x)
    return text.replace("|", "\\|")


def _theta_cell(v: float | None) -> str:
    if v is None:
        return MISSING
    return next((mark for bound, mark in _BAND_MARKS if v < bound), "⬜") + f" {v:.2f}"     # NaN: no band


def render_markdown(manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> str:
    """Heading, model and calibration lines, the per-layer table, the θ matrix and the findings."""
    d = build_digest(manifest, tables)
    name = (manifest.get("checkpoint") or {}).get("checkpoint") or MISSING
    out = [f"## attnstab: {name}", "", f"`{d['model']}`", "", d["calibration"], ""]
    cols = d["layer_columns"]
    if d["layers"]:
        out += ["| layer | " + " | ".join(_cell(h) for h in cols.values()) + " |", "|---:" * (len(cols) + 1) + "|"]
        out += ["| " + " | ".join(_cell(r.get(c)) for c in ("layer", *cols)) + " |" for r in d["layers"]]
        out += ["", "; ".join(f"{h}: {COLUMN_NOTES[h]}" for h in cols.values()), ""]
    bp = d["bound_product"]
    if bp.get("log_lip_model_calibrated") is not None:
        out += [f"End-to-end: log ∏ layer bounds = {format_value(bp['log_lip_model_weights'])} (tier 1), "
                f"{format_value(bp['log_lip_model_calibrated'])} (tier 2, worst sequence).", ""]
    if d["grad"] is not None:
        out += [f"Gradient flow: {d['grad']['loss_kind']} = {format_value(d['grad']['loss'])}.", ""]
    if d["theta_mean"]:
        n_heads = len(d["theta_mean"][0])
        out += ["<details><summary>θ mean by layer × head</summary>", "",
                "| layer | " + " | ".join(str(h) for h in range(n_heads)) + " |", "|---:" * (n_heads + 1) + "|"]
        out += [f"| {layer} | " + " | ".join(_theta_cell(v) for v in row) + " |"
                for layer, row in enumerate(d["theta_mean"])]
        out += ["", "</details>", ""]
    if d["theta_note"]:
        out += [d["theta_note"], ""]
    if d["layer_types_note"]:
        out += [d["layer_types_note"], ""]
    if d["curvature"]:
        out += ["| layer | sharpest block | λ_max | trace | ± se | ‖∇‖ | converged |", "|---:" * 7 + "|"]
        out += ["| " + " | ".join(_cell(x) for x in ("all" if r["layer"] is None else r["layer"], r["sharpest_block"],
                                                     r["lambda_max"], r["trace_est"], r["trace_se"], r["grad_norm"],
                                                     r["converged"])) + " |" for r in d["curvature"]]
        out.append("")
    if d["findings"]:
        out += ["### Findings", ""]
        out += [f"- {'⚠️ ' if f['severity'] == 'warn' else ''}{f['text']}" for f in d["findings"]]
        out.append("")
    return "\n".join(out)

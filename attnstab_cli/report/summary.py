"""Rich terminal summary of a scan (fits a 100-column terminal): the digest (``digest.py``) plus, on request, the
per-layer tables of every metric family."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from attnstab_cli.metrics.fragility import RHO_TARGET
from attnstab_cli.metrics.sensitivity import describe_depth_rule
from attnstab_cli.report.cells import MISSING, format_value
from attnstab_cli.report.digest import build_digest
from attnstab_cli.report.heatmap import notable_heads, theta_heatmap


def render_summary(console: Console, manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]],
                   detail: bool = False) -> None:
    """Model and calibration lines, the per-layer table, the θ heatmap and the findings (``digest.py``); with
    ``detail`` also the per-layer tables of every metric family. Fits a 100-column terminal."""
    digest = build_digest(manifest, tables)
    calibrated = manifest.get("calibration") is not None
    console.print(f"[bold]{digest['model']}[/]", highlight=False)
    console.print(digest["calibration"], highlight=False)
    _layer_table(console, "per layer", digest["layers"], digest["layer_columns"], style=box.SIMPLE_HEAD)
    bp = digest["bound_product"]
    if bp.get("log_lip_model_calibrated") is not None:
        console.print(f"end-to-end: log ∏ layer bounds = {format_value(bp['log_lip_model_weights'])} (tier 1), "
                      f"{format_value(bp['log_lip_model_calibrated'])} (tier 2, worst sequence)", highlight=False)
    if digest["grad"] is not None:
        g = digest["grad"]
        path = {True: "an identity path (an additive residual: pre-LN, parallel, branch-output norms)",
                None: f"identity path {MISSING}",
                False: "no identity path (post-LN: every factor starts with a norm Jacobian, THEORY §9)"}[
            g["identity_path"]]
        console.print(f"gradient flow: {g['loss_kind']} = {format_value(g['loss'])}; {path}", highlight=False)
    if calibrated and tables.get("heads"):
        console.print(theta_heatmap(tables["heads"]))
    if digest["theta_note"]:
        console.print(digest["theta_note"], highlight=False)
    if digest["curvature"]:
        _curvature_table(console, digest["curvature"])
    if digest["findings"]:
        console.print("[bold]findings[/]")
        for f in digest["findings"]:
            mark = "[yellow]![/]" if f["severity"] == "warn" else "·"
            console.print(f" {mark} {f['text']}", highlight=False)
    if detail:
        _detail_tables(console, manifest, tables)


def _curvature_table(console: Console, rows: list[dict[str, Any]]) -> None:
    """Where the loss surface is sharpest: per layer its sharpest block, and the whole model."""
    table = Table(title="curvature: Hessian of the --grad loss per block (λ_max by Lanczos, trace by Hutchinson)",
                  title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for heading in ("layer", "sharpest block", "λ_max", "trace (sum of blocks)", "± se", "‖∇‖", "converged"):
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row("all" if r["layer"] is None else str(r["layer"]), r["sharpest_block"] or MISSING,
                      format_value(r["lambda_max"]), format_value(r["trace_est"]), format_value(r["trace_se"], ".2g"),
                      format_value(r["grad_norm"]), MISSING if r["converged"] is None else
                      ("yes" if r["converged"] else "[yellow]no[/]"))
    console.print(table)


def _detail_tables(console: Console, manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> None:
    """Every metric family's per-layer table (``--detail``)."""
    cal = manifest.get("calibration")
    if cal is not None:
        _layer_table(console, "activations per layer", tables["layers"], {
            "r_resid_mean": "|h| mean", "r_resid_max": "|h| max", "r2_in": "R2 attn in", "r2_ffn_in": "R2 ffn in",
            "norm1_min_var": "min var 1", "norm2_min_var": "min var 2"})
    _layer_table(console, "weights per layer", tables["layers"], {
        "proj_product_layer": "Π = ‖Q‖‖K‖‖V‖‖O‖", "alpha_geo": "Π^¼", "kappa_eff": "κ_eff", "ffn_w1_norm": "‖W1‖",
        "ffn_w2_norm": "‖W2‖", "norm1_gamma_max": "max|γ1|", "norm2_gamma_max": "max|γ2|"})
    if cal is not None:
        _layer_table(console, "attention sensitivity proxy S = 2sθ̄R²Π (THEORY §12)", tables["layers"], {
            "theta_bar": "θ̄", "sens_proxy_resid": "S (R = resid)", "sens_proxy_ln": "S (R = normed)"})
    model = (tables.get("model") or [{}])[0]
    alphas = [r["alpha_geo"] for r in tables["layers"] if r.get("alpha_geo") is not None]
    if model.get("depth_budget") is not None and model.get("n_layers") is not None and alphas:
        console.print(describe_depth_rule(model["n_layers"], alphas, model["depth_budget"]), highlight=False)
    if cal is not None:
        _layer_table(console, "Lipschitz bounds per layer (‖·‖∞,2; THEORY §7-8)", tables["layers"], {
            "lip_layer_weights": "tier 1 (weights)", "lip_layer_calibrated": "tier 2 (at text)",
            "lip_layer_refined": "tier 2r", "lip_layer_empirical": "tier 3 (lower)", "tightness": "3 ÷ 2"})
        _fragility_lines(console, tables["layers"])
    if model.get("grad_loss_kind") is not None:
        _layer_table(console, "gradient norms per layer", tables["layers"], {
            "grad_h_in": "‖∂L/∂h_l‖", "grad_attn_params": "‖∇ attn‖", "grad_ffn_params": "‖∇ ffn‖",
            "grad_norm_params": "‖∇ norms‖"})
    if tables.get("heads") and cal is not None:
        console.print(notable_heads(tables["heads"]))


def _layer_table(console: Console, title: str, rows: list[dict[str, Any]], columns: dict[str, str],
                 style: box.Box | None = box.HEAVY_HEAD) -> None:
    table = Table(title=title, title_justify="left", box=style, padding=(0, 1))
    table.add_column("layer", justify="right")
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), *(format_value(r.get(c)) for c in columns))
    console.print(table)


def _fragility_lines(console: Console, layers: list[dict[str, Any]]) -> None:
    """Flag layers whose norm ρ_LN (THEORY §13) reaches the authors' target ρ⋆ in a low precision, with the ε their
    mitigation would choose where it applies (ρ⋆ < ρ_LN < 1)."""
    for prec in ("bf16", "fp16"):
        hit = [r for r in layers if r.get(f"rho_ln_{prec}") is not None and r[f"rho_ln_{prec}"] > RHO_TARGET]
        if not hit:
            console.print(f"norm fragility ({prec}): ρ_LN ≤ {RHO_TARGET} in every layer", highlight=False)
            continue
        parts = []
        for r in hit:
            eps = r[f"ln_eps_suggested_{prec}"]
            parts.append(f"{r['layer']} (ρ_LN {r[f'rho_ln_{prec}']:.3g}"
                         + (f", suggested ε {eps:.2g})" if eps is not None else ", ≥ 1: outside the mitigation)"))
        console.print(f"norm fragility ({prec}, THEORY §13): layers " + ", ".join(parts), highlight=False)

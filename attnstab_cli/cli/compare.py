"""``attnstab compare A B``: two reports or checkpoints side by side, with the sensitivity attribution of THEORY §12.

Checkpoints are scanned first, both on identical tokens: A's (from its report's ``tokens.npy``, or built from the
calibration flags), then B on exactly those ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.table import Table

from attnstab_cli.cli.options import Force, Json, Quiet
from attnstab_cli.cli.output import handle_errors, print_json, require_one_process, stderr_console, stdout_console
from attnstab_cli.cli.scan_flags import ScanFlags, with_scan_flags
from attnstab_cli.cli.targets import resolve_target
from attnstab_cli.compare import Comparison, compare_reports, write_comparison
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature.loss import ModelLoss
from attnstab_cli.metrics.curvature.taylor import compute_taylor
from attnstab_cli.model.load import open_model
from attnstab_cli.scan import resolve_device
from attnstab_cli.report.read import is_report_dir, load_calibration
from attnstab_cli.report.same_tokens import tokens_for
from attnstab_cli.report.summary import format_value
from attnstab_cli.report.destination import check_destination
from attnstab_cli.report.write import write_report

Target = Annotated[str, typer.Argument(help="A report directory (attnstab scan --out) or a checkpoint.",
                                       show_default=False)]


@handle_errors
@with_scan_flags
def compare(
    a: Target,
    b: Target,
    allow_different_calibration: Annotated[bool, typer.Option(
        "--allow-different-calibration", help="Compare reports scanned on different tokens.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the comparison (layers.parquet, heads.parquet, compare.json) to this "
                            "directory, atomically.")] = None,
    force: Force = False,
    save_reports: Annotated[Path | None, typer.Option(
        "--save-reports", help="Also keep the scans of checkpoint arguments as reports DIR/a and DIR/b.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Heads listed among the largest movers.")] = 8,
    loss: Annotated[bool, typer.Option(
        "--loss", help="Also the Taylor account of the loss change (A and B checkpoints of one architecture): "
                       "actual change, first-order, second-order at A and symmetric predictions, per layer and "
                       "block (one Hessian-vector product at A and one at B; every layer resident).")] = False,
    json_out: Json = False, quiet: Quiet = False,
    *, flags: ScanFlags,
) -> None:
    """Compare B with A per layer and per head and attribute the change in attention sensitivity."""
    require_one_process("compare")
    a_is_report, b_is_report = is_report_dir(Path(a)), is_report_dir(Path(b))
    if out is not None:
        check_destination(out, "compare", force, [a, b])
    if save_reports is not None:
        for name, is_report in (("a", a_is_report), ("b", b_is_report)):
            if not is_report:
                check_destination(save_reports / name, "report", force, [a, b])
    req = flags.request(a)
    if loss and (a_is_report or b_is_report):
        raise UsageError("--loss needs A and B as checkpoints (the weights), not reports")
    if b_is_report and not a_is_report:                 # scan A on B's tokens
        rb, _ = resolve_target(b, req)
        ra, _ = resolve_target(a, req, tokens_for(rb)[0], quiet)
    else:
        ra, calib_a = resolve_target(a, req, None, quiet)
        rb, _ = resolve_target(b, req, None if b_is_report else (calib_a or tokens_for(ra)[0]), quiet)
    if save_reports is not None:
        for name, report, is_report in (("a", ra, a_is_report), ("b", rb, b_is_report)):
            if not is_report:
                write_report(save_reports / name, report.tables, report.manifest, force=force, tokens=report.tokens)
    comp = compare_reports(ra, rb, allow_different_calibration, labels=(a, b))
    if loss:
        calib = load_calibration(ra)
        dev = resolve_device(flags.device)            # the expansion runs in float64 whatever the scans' --dtype
        comp.loss_blocks, comp.loss_totals = compute_taylor(
            ModelLoss(open_model(a, flags.arch, req.overrides), list(calib.batches), dev, torch.float64, flags.seed),
            ModelLoss(open_model(b, flags.arch, req.overrides), list(calib.batches), dev, torch.float64, flags.seed))
    if out is not None:
        write_comparison(out, comp, force)
        if not quiet:
            stderr_console().print(f"comparison written to {out}", highlight=False)
    if json_out:
        print_json(comp.as_json())
    else:
        render_comparison(comp, top)


def render_comparison(comp: Comparison, top: int) -> None:
    """Side-by-side layers (and the routing of mixture-of-experts layers), the attribution sorted by the largest
    movers, the heads and the experts that moved most."""
    console = stdout_console()
    console.print(f"A = {comp.a['label']}   B = {comp.b['label']}", highlight=False)
    for note in comp.notes:
        console.print(f"note: {note}", highlight=False)
    side = Table(title="side by side (A → B)", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    cols = {"theta_bar": "θ̄", "proj_product_layer": "Π", "r_ln_mean": "R normed", "sens_proxy_ln": "S normed",
            "lip_layer_calibrated": "tier-2 bound", "grad_h_in": "‖∂L/∂h_l‖"}
    cols = {c: h for c, h in cols.items() if any(r[c + "_a"] is not None or r[c + "_b"] is not None
                                                 for r in comp.layers)}
    for heading in ("layer", *cols.values()):
        side.add_column(heading, justify="right")
    for r in comp.layers:
        side.add_row(str(r["layer"]), *(f"{format_value(r[c + '_a'], '.3g')}→{format_value(r[c + '_b'], '.3g')}"
                                        for c in cols))
    console.print(side)
    _render_routing(comp)
    attr = Table(title="attribution Δlog S = Δlog θ̄ + Δlog Π + 2Δlog R (THEORY §12), largest first",
                 title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("layer", "Δlog S", "Δlog θ̄", "Δlog Π", "2Δlog R", "Δlog 2s", "Δlog R resid", "main term"):
        attr.add_column(col, justify="right")
    for r in sorted(comp.layers, key=lambda r: -abs(r["dlog_sens_ln"] or 0.0)):
        two_r = None if r["dlog_r_ln"] is None else 2 * r["dlog_r_ln"]
        terms = {"θ": r["dlog_theta"], "Π": r["dlog_proj"], "R": two_r}
        main = max((k for k in terms if terms[k] is not None), key=lambda k: abs(terms[k]), default="-")
        attr.add_row(str(r["layer"]), *(format_value(x, "+.4f") for x in (
            r["dlog_sens_ln"], r["dlog_theta"], r["dlog_proj"], two_r, r["dlog_scale"], r["dlog_r_resid"])), main)
    console.print(attr)
    if comp.heads:
        heads = Table(title=f"heads that moved most: |Δlog θ_h + Δlog Π_h|, top {top}", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=(0, 1))
        for col in ("layer", "head", "θ A→B", "θ p05 A→B", "p_max A→B", "Π_h A→B", "Δlog θ", "Δlog Π_h"):
            heads.add_column(col, justify="right")
        for r in sorted(comp.heads, key=lambda r: -abs(r["dlog_theta_proj"] or 0.0))[:top]:
            heads.add_row(str(r["layer"]), str(r["head"]),
                          *(f"{format_value(r[c + '_a'], '.3g')}→{format_value(r[c + '_b'], '.3g')}"
                            for c in ("theta_mean", "theta_p05", "pmax_mean", "proj_product")),
                          format_value(r["dlog_theta"], "+.3f"), format_value(r["dlog_proj"], "+.3f"))
        console.print(heads)
    if comp.experts:
        _render_experts(comp, top)
    if comp.loss_totals is not None:
        render_loss(comp)


MOE_HEADINGS = {"router_margin_min": "margin min", "router_margin_p05": "margin p05", "expert_load_max": "load max",
                "expert_load_cv": "load cv", "router_entropy_mean": "router entropy", "gate_theta_mean": "gate θ"}


def _render_routing(comp: Comparison) -> None:
    """The routing columns of the layers that are mixtures of experts in A or B (THEORY §18.7)."""
    rows = [r for r in comp.layers if any(r[c + "_a"] is not None or r[c + "_b"] is not None for c in MOE_HEADINGS)]
    if not rows:
        return
    table = Table(title="routing of mixture-of-experts layers (A → B)", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1))
    for heading in ("layer", *MOE_HEADINGS.values()):
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), *(f"{format_value(r[c + '_a'], '.3g')}→{format_value(r[c + '_b'], '.3g')}"
                                         for c in MOE_HEADINGS))
    stdout_console().print(table)


def _render_experts(comp: Comparison, top: int) -> None:
    """The experts whose load share moved most, with their ball bound and weight norms on both sides."""
    table = Table(title=f"experts that moved most: |Δ load share|, top {top}", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("layer", "expert", "load share A→B", "Δ load share", "ball bound A→B", "‖W_down‖ A→B"):
        table.add_column(col, justify="right")
    for r in sorted(comp.experts, key=lambda r: -abs(r["load_share_delta"] or 0.0))[:top]:
        table.add_row(str(r["layer"]), str(r["expert"]),
                      f"{format_value(r['load_share_a'], '.3g')}→{format_value(r['load_share_b'], '.3g')}",
                      format_value(r["load_share_delta"], "+.3g"),
                      *(f"{format_value(r[c + '_a'], '.3g')}→{format_value(r[c + '_b'], '.3g')}"
                        for c in ("lip_expert_weights", "out_norm")))
    stdout_console().print(table)


def render_loss(comp: Comparison) -> None:
    """The Taylor account: totals and residuals, then the blocks sorted by their second-order contribution."""
    console, t = stdout_console(), comp.loss_totals
    console.print(f"loss ({t['loss_kind']}): A {t['loss_a']:.6g} → B {t['loss_b']:.6g}, ΔL = {t['delta_loss']:+.4g} "
                  f"= {t['delta_loss_layers']:+.4g} (layers, expanded below) {t['embeddings_and_head']:+.4g} "
                  f"(embeddings and head)", highlight=False)
    for p, name in (("first_order", "first order gᵀΔw"), ("second_order", "second order at A"),
                    ("symmetric", "symmetric (corrected trapezoid)")):
        console.print(f"  {name:32} {t[p]:+.6g}   residual {t['residual_' + p]:+.3g}", highlight=False)
    table = Table(title="Taylor terms per block, largest symmetric contribution first", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for heading in ("layer", "block", "‖Δw‖", "first order", "second order", "symmetric"):
        table.add_column(heading, justify="right")
    for r in sorted(comp.loss_blocks, key=lambda r: -abs(r["symmetric"])):        # the most accurate of the three
        table.add_row(str(r["layer"]), r["block"], format_value(r["dw_norm"], ".3g"),
                      *(format_value(r[k], "+.4g") for k in ("first_order", "second_order", "symmetric")))
    console.print(table)

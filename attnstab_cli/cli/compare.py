"""``attnstab compare A B``: two reports side by side, with the sensitivity attribution of THEORY §12."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from attnstab_cli.cli.options import Json
from attnstab_cli.cli.output import handle_errors, print_json, stdout_console
from attnstab_cli.compare import check_comparable, compare_layers
from attnstab_cli.report.read import load_report
from attnstab_cli.report.summary import format_value


@handle_errors
def compare(
    a: Annotated[Path, typer.Argument(help="Report directory A (the reference), written by attnstab scan --out.")],
    b: Annotated[Path, typer.Argument(help="Report directory B, compared with A.")],
    allow_different_calibration: Annotated[bool, typer.Option(
        "--allow-different-calibration", help="Compare reports scanned on different tokens.")] = False,
    json_out: Json = False,
) -> None:
    """Compare two reports layer by layer and attribute the change in attention sensitivity (B relative to A)."""
    ra, rb = load_report(a), load_report(b)
    notes = check_comparable(ra, rb, allow_different_calibration)
    rows = compare_layers(ra, rb)
    if json_out:
        print_json({"a": str(a), "b": str(b), "notes": notes, "layers": rows})
        return
    console = stdout_console()
    console.print(f"A = {a}   B = {b}", highlight=False)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    side = Table(title="side by side (A → B)", title_justify="left")
    for col in ("layer", "θ̄", "Π", "R normed", "S normed", "tier-2 bound", "‖∂L/∂h_l‖"):
        side.add_column(col, justify="right")
    for r in rows:
        side.add_row(str(r["layer"]), *(f"{format_value(r[c + '_a'], '.3g')}→{format_value(r[c + '_b'], '.3g')}" for c in (
            "theta_bar", "proj_product_layer", "r_ln_mean", "sens_proxy_ln", "lip_layer_calibrated", "grad_h_in")))
    console.print(side)
    attr = Table(title="Δlog S = Δlog θ̄ + Δlog Π + 2Δlog R (THEORY §12), R = normed attention input; largest first",
                 title_justify="left")
    for col in ("layer", "Δlog S", "Δlog θ̄", "Δlog Π", "2Δlog R", "Δlog R resid"):
        attr.add_column(col, justify="right")
    ranked = sorted(rows, key=lambda r: -abs(r["dlog_sens_ln"] or 0.0))
    for r in ranked:
        two_r = None if r["dlog_r_ln"] is None else 2 * r["dlog_r_ln"]
        attr.add_row(str(r["layer"]), *(format_value(x, "+.4f") for x in (r["dlog_sens_ln"], r["dlog_theta"], r["dlog_proj"],
                                                                   two_r, r["dlog_r_resid"])))
    console.print(attr)

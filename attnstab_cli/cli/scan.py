"""``attnstab scan``: calibration text through a checkpoint, one layer at a time, into a report."""
from __future__ import annotations

from typing import Annotated

import typer

from attnstab_cli.cli.options import Checkpoint, Detail, Force, Format, Json, Out, Quiet, check_format
from attnstab_cli.cli.output import handle_errors, silence_errors, stderr_console
from attnstab_cli.cli.render import render_report
from attnstab_cli.cli.scan_flags import ScanFlags, with_scan_flags
from attnstab_cli.cli.targets import scan_with_progress
from attnstab_cli.distributed.group import process_group
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature_scan import CurvatureOptions
from attnstab_cli.report.destination import check_destination
from attnstab_cli.report.write import write_report

CURVATURE = CurvatureOptions()          # the defaults the curvature options show


@handle_errors
@with_scan_flags
def scan(
    checkpoint: Checkpoint,
    flags: ScanFlags,
    out: Out = None,
    force: Force = False,
    weights_only: Annotated[bool, typer.Option(
        "--weights-only", help="Only the weight metrics (norms, condition numbers, FFN and norm-layer facts): no "
                               "calibration text, one layer resident at a time.")] = False,
    curvature: Annotated[bool, typer.Option(
        "--curvature", help="Also the Hessian of the --grad loss per layer and parameter block: top eigenvalue "
                            "(Lanczos), trace (Hutchinson), gradient norm, and the whole-model top eigenvalue. Keeps "
                            "every layer resident.")] = False,
    curvature_iters: Annotated[int, typer.Option(
        "--curvature-iters", min=1, help="Lanczos steps (Hessian-vector products) per block at most.")]
    = CURVATURE.max_iter,
    curvature_tol: Annotated[float, typer.Option(
        "--curvature-tol", min=0.0, help="Stop Lanczos when the Ritz residual is <= tol x |lambda|.")] = CURVATURE.tol,
    curvature_probes: Annotated[int, typer.Option(
        "--curvature-probes", min=1, help="Hutchinson probes per block for the trace.")] = CURVATURE.probes,
    curvature_dtype: Annotated[str, typer.Option(
        "--curvature-dtype", help="float64 (default) or float32 for the curvature pass.")] = CURVATURE.dtype,
    fmt: Format = "rich", json_out: Json = False, detail: Detail = False, quiet: Quiet = False,
) -> None:
    """Scan a checkpoint on calibration text and write/print the per-layer report."""
    fmt = check_format(fmt, json_out)
    if curvature and weights_only:
        raise UsageError("--curvature needs calibration text (the Hessian is of the loss on it); drop --weights-only")
    req = flags.request(checkpoint, weights_only=weights_only,
                        curvature=CurvatureOptions(max_iter=curvature_iters, tol=curvature_tol,
                                                   probes=curvature_probes, dtype=curvature_dtype, seed=flags.seed)
                        if curvature else None)
    with process_group(flags.device) as group:             # started by torchrun: one rank of several
        silence_errors(not group.is_root)
        if out is not None and group.is_root:
            check_destination(out, "report", force, [checkpoint])
        err = stderr_console()
        report, _ = scan_with_progress(req, quiet=quiet or not group.is_root, err=err, group=group)
        if group.is_root:
            if out is not None:
                write_report(out, report.tables, report.manifest, force=force, tokens=report.tokens)
                report.path = out
                if not quiet:
                    err.print(f"report written to {out}", highlight=False)
            render_report(report, fmt, detail=detail)
        group.checkpoint("the report")                      # every rank exits non-zero if rank 0 could not write

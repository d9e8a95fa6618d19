"""``attnstab scan``: calibration text through a checkpoint, one layer at a time, into a report."""
from __future__ import annotations

from typing import Annotated

import typer

from attnstab_cli.cli.options import (
    Arch, BatchSize, Batches, Calib, Checkpoint, Detail, Device, Dtype, EmpiricalSeqs, Force, Format, Grad, HashMode, Json,
    NHeads, NKVHeads, NormEps, Out, Quiet, RopeTheta, Seed, SeqLen, Tokens, check_format, config_overrides,
)
from attnstab_cli.cli.output import handle_errors, stderr_console
from attnstab_cli.cli.render import render_report
from attnstab_cli.cli.targets import build_scan_request, scan_with_progress
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature_scan import CurvatureOptions
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.report.destination import check_destination
from attnstab_cli.report.write import write_report

THETA, CURVATURE = ThetaOptions(), CurvatureOptions()     # the defaults the options show


def parse_theta_rows(value: str) -> int | None:
    """``--theta-rows``: a non-negative count, or ``all`` (None: refine every wide row)."""
    if value.strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"--theta-rows must be a non-negative integer or 'all', got {value!r}")
    return n


@handle_errors
def scan(
    checkpoint: Checkpoint,
    out: Out = None,
    force: Force = False,
    calib: Calib = None,
    tokens: Tokens = None,
    seq_len: SeqLen = None,
    batch_size: BatchSize = 4,
    batches: Batches = 2,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "float32",
    kernel: Annotated[str, typer.Option(
        "--kernel", help="Row statistics: auto (Triton on CUDA, torch otherwise), torch or triton.")] = "auto",
    min_keys: Annotated[int, typer.Option(
        "--min-keys", min=1, help="Rows with fewer unmasked keys are left out of the descriptive θ aggregates "
                                  "(counted in n_rows_short; the bound input theta_tilde still uses them).")] = THETA.min_keys,
    theta_tol: Annotated[float, typer.Option(
        "--theta-tol", min=0.0, help="Refine rows whose certified θ interval is wider than this.")] = THETA.tol,
    theta_rows: Annotated[str, typer.Option(
        "--theta-rows", help="Wide rows refined per head and sequence (all rows with ≤ 20 keys always are), "
                             "or 'all'.")] = str(THETA.rows_per_head),
    top_k: Annotated[int, typer.Option(
        "--top-k", min=0, max=20, help="k of the top-k θ upper bound (2^k subset sums per refined row).")] = THETA.top_k,
    theta_slack: Annotated[float, typer.Option(
        "--theta-slack", min=0.0, max=0.5, help="Widening of every θ interval for float32 rounding of q, k.")] = THETA.slack,
    empirical_seqs: EmpiricalSeqs = 1,
    grad: Grad = False,
    weights_only: Annotated[bool, typer.Option(
        "--weights-only", help="Only the weight metrics (norms, condition numbers, FFN and norm-layer facts): no "
                               "calibration text, one layer resident at a time.")] = False,
    hash_mode: HashMode = "sampled",
    curvature: Annotated[bool, typer.Option(
        "--curvature", help="Also the Hessian of the --grad loss per layer and parameter block: top eigenvalue "
                            "(Lanczos), trace (Hutchinson), gradient norm, and the whole-model top eigenvalue. Keeps "
                            "every layer resident.")] = False,
    curvature_iters: Annotated[int, typer.Option(
        "--curvature-iters", min=1, help="Lanczos steps (Hessian-vector products) per block at most.")] = CURVATURE.max_iter,
    curvature_tol: Annotated[float, typer.Option(
        "--curvature-tol", min=0.0, help="Stop Lanczos when the Ritz residual is <= tol x |lambda|.")] = CURVATURE.tol,
    curvature_probes: Annotated[int, typer.Option(
        "--curvature-probes", min=1, help="Hutchinson probes per block for the trace.")] = CURVATURE.probes,
    curvature_dtype: Annotated[str, typer.Option(
        "--curvature-dtype", help="float64 (default) or float32 for the curvature pass.")] = CURVATURE.dtype,
    arch: Arch = None, n_heads: NHeads = None, n_kv_heads: NKVHeads = None, norm_eps: NormEps = None,
    rope_theta: RopeTheta = None, fmt: Format = "rich", json_out: Json = False, detail: Detail = False,
    quiet: Quiet = False,
) -> None:
    """Scan a checkpoint on calibration text and write/print the per-layer report."""
    fmt = check_format(fmt, json_out)
    if curvature and weights_only:
        raise UsageError("--curvature needs calibration text (the Hessian is of the loss on it); drop --weights-only")
    if out is not None:
        check_destination(out, "report", force, [checkpoint])
    theta = ThetaOptions(min_keys=min_keys, tol=theta_tol, rows_per_head=parse_theta_rows(theta_rows), top_k=top_k,
                         slack=theta_slack, seed=seed)
    req = build_scan_request(checkpoint, calib=calib, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                             batches=batches, seed=seed, device=device, dtype=dtype, grad=grad,
                             empirical_seqs=empirical_seqs, hash_mode=hash_mode, theta=theta, kernel=kernel,
                             weights_only=weights_only, arch=arch,
                             overrides=config_overrides(n_heads, n_kv_heads, norm_eps, rope_theta),
                             curvature=CurvatureOptions(max_iter=curvature_iters, tol=curvature_tol,
                                                        probes=curvature_probes, dtype=curvature_dtype, seed=seed)
                             if curvature else None)
    err = stderr_console()
    report, _ = scan_with_progress(req, quiet=quiet, err=err)
    if out is not None:
        write_report(out, report.tables, report.manifest, force=force, tokens=report.tokens)
        report.path = out
        if not quiet:
            err.print(f"report written to {out}", highlight=False)
    render_report(report, fmt, detail=detail)

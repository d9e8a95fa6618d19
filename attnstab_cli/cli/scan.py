"""``attnstab scan``: calibration text through a checkpoint, one layer at a time, into a report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnstab_cli.calibration.build import CalibrationRequest, build_calibration
from attnstab_cli.cli.options import (
    Arch, Checkpoint, Force, Json, NHeads, NKVHeads, NormEps, Out, Quiet, RopeTheta, config_overrides,
)
from attnstab_cli.cli.output import handle_errors, print_json, stderr_console, stdout_console
from attnstab_cli.errors import UsageError
from attnstab_cli.kernel_dispatch import resolve_kernel
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.model.load import open_model
from attnstab_cli.report.summary import render_summary
from attnstab_cli.report.write import check_output_dir, write_report
from attnstab_cli.scan import (ScanOptions, build_manifest, resolve_device, resolve_dtype, run_scan,
                               run_weights_only)


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
    calib: Annotated[Optional[str], typer.Option(
        "--calib", help="Calibration text: a .txt, .jsonl (field 'text') or .parquet (column 'text') file, or "
                        "'random' for uniform random token ids. Default: the bundled corpus.")] = None,
    tokens: Annotated[Optional[Path], typer.Option(
        "--tokens", help="Token ids (.npy or .pt, shape \\[batch, seq] or \\[seq]) used exactly as given.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Tokens per sequence (default min(256, the model's maximum positions)).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per batch.")] = 4,
    batches: Annotated[int, typer.Option("--batches", help="Number of batches.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for random calibration and sampling.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, float64, bfloat16, float16.")] = "float32",
    kernel: Annotated[str, typer.Option(
        "--kernel", help="Row statistics: auto (Triton on CUDA, torch otherwise), torch or triton.")] = "auto",
    min_keys: Annotated[int, typer.Option(
        "--min-keys", min=1, help="Rows with fewer unmasked keys are left out of the descriptive θ aggregates "
                                  "(counted in n_rows_short; the bound input theta_tilde still uses them).")] = 16,
    theta_tol: Annotated[float, typer.Option(
        "--theta-tol", min=0.0, help="Refine rows whose certified θ interval is wider than this.")] = 1e-6,
    theta_rows: Annotated[str, typer.Option(
        "--theta-rows", help="Wide rows refined per head and sequence (all rows with ≤ 20 keys always are), "
                             "or 'all'.")] = "256",
    top_k: Annotated[int, typer.Option(
        "--top-k", min=0, max=20, help="k of the top-k θ upper bound (2^k subset sums per refined row).")] = 14,
    theta_slack: Annotated[float, typer.Option(
        "--theta-slack", min=0.0, max=0.5, help="Widening of every θ interval for float32 rounding of q, k.")] = 1e-6,
    empirical_seqs: Annotated[int, typer.Option(
        "--empirical-seqs", min=0, help="Sequences per layer for the tier-3 empirical Lipschitz lower bound and the "
                                        "tightness ratios (float64 autograd; 0 skips tier 3).")] = 1,
    grad: Annotated[bool, typer.Option(
        "--grad", help="Also the gradient flow: per-layer gradient norms of the training loss (or a probe loss), "
                       "streamed backward one layer at a time.")] = False,
    weights_only: Annotated[bool, typer.Option(
        "--weights-only", help="Only the weight metrics (norms, condition numbers, FFN and norm-layer facts): no "
                               "calibration text, one layer resident at a time.")] = False,
    arch: Arch = None, n_heads: NHeads = None, n_kv_heads: NKVHeads = None, norm_eps: NormEps = None,
    rope_theta: RopeTheta = None, json_out: Json = False, quiet: Quiet = False,
) -> None:
    """Scan a checkpoint on calibration text and write/print the per-layer report."""
    if out is not None:
        check_output_dir(out, force)
    resolve_kernel(kernel, resolve_device(device)), resolve_dtype(dtype), parse_theta_rows(theta_rows)
    model = open_model(checkpoint, arch, config_overrides(n_heads, n_kv_heads, norm_eps, rope_theta))
    err = stderr_console()
    if weights_only:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=quiet or not err.is_terminal, transient=True) as progress:
            task = progress.add_task("layers", total=model.cfg.n_layers)
            result = run_weights_only(model, ScanOptions(device=device, dtype=dtype),
                                      on_step=lambda layer, batch: progress.advance(task))
        _publish(out, force, quiet, json_out, build_manifest(model, None, result, seed), result.tables, err)
        return
    req = CalibrationRequest(calib=calib, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                             batches=batches, seed=seed)
    cal = build_calibration(req, model.cfg.vocab_size, model.cfg.max_positions, model.tokenizer_path, checkpoint)
    theta = ThetaOptions(min_keys=min_keys, tol=theta_tol, rows_per_head=parse_theta_rows(theta_rows),
                         top_k=top_k, slack=theta_slack, seed=seed)
    opts = ScanOptions(device=device, dtype=dtype, kernel=kernel, theta=theta, grad=grad,
                       empirical_seqs=empirical_seqs)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=quiet or not err.is_terminal, transient=True) as progress:
        task = progress.add_task("layers x batches", total=model.cfg.n_layers * len(cal.batches))
        result = run_scan(model, cal, opts, on_step=lambda layer, batch: progress.advance(task))
    _publish(out, force, quiet, json_out, build_manifest(model, cal, result, seed), result.tables, err)


def _publish(out: Path | None, force: bool, quiet: bool, json_out: bool, manifest: dict, tables: dict,
             err: Console) -> None:
    """Write the report (atomically) and print it as JSON or as the rich summary."""
    if out is not None:
        write_report(out, tables, manifest, force=force)
        if not quiet:
            err.print(f"report written to {out}", highlight=False)
    if json_out:
        print_json({"manifest": manifest, **tables})
    else:
        render_summary(stdout_console(), manifest, tables)

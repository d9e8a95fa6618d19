"""Turn a command's TARGET (a report directory or a checkpoint) into a report, scanning with a progress bar."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnstab_cli.calibration.build import CalibrationRequest
from attnstab_cli.calibration.shortfall import describe_shortfall
from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.cli.options import check_seed
from attnstab_cli.cli.output import stderr_console
from attnstab_cli.distributed.group import SOLO, Group
from attnstab_cli.errors import UsageError
from attnstab_cli.metrics.curvature_scan import CurvatureOptions
from attnstab_cli.metrics.theta_scan import ThetaOptions
from attnstab_cli.report.read import Report, is_report_dir, load_report
from attnstab_cli.scan import ScanOptions, ScanRequest, resolve_device, resolve_dtype, scan_checkpoint


def build_scan_request(checkpoint: str, *, calib: str | None = None, tokens: Path | None = None,
                       seq_len: int | None = None, batch_size: int = 4, batches: int = 2, seed: int = 0,
                       device: str = "auto", dtype: str = "float32", grad: bool = False, empirical_seqs: int = 1,
                       hash_mode: str = "sampled", theta: ThetaOptions | None = None, kernel: str = "auto",
                       weights_only: bool = False, arch: str | None = None,
                       overrides: dict | None = None, curvature: CurvatureOptions | None = None) -> ScanRequest:
    """The shared scan flags as a :class:`ScanRequest`; device and dtype are checked before any work."""
    from attnstab_cli.kernel_dispatch import resolve_kernel

    resolve_kernel(kernel, resolve_device(device)), resolve_dtype(dtype)
    check_seed(seed)
    if hash_mode not in ("sampled", "full"):
        raise UsageError(f"--hash must be 'sampled' or 'full', got {hash_mode!r}")
    theta = replace(theta or ThetaOptions(), seed=seed)
    return ScanRequest(checkpoint,
                       CalibrationRequest(calib=calib, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                                          batches=batches, seed=seed),
                       ScanOptions(device=device, dtype=dtype, kernel=kernel, grad=grad,
                                   empirical_seqs=empirical_seqs, theta=theta, curvature=curvature),
                       weights_only=weights_only, hash_mode=hash_mode, arch=arch, overrides=overrides)


class ProgressReport:
    """Progress of the scan's stages on stderr: a transient bar per stage on a terminal, otherwise one line per
    stage step at most every ``LINE_EVERY_S`` seconds (and always its last step); nothing when quiet."""

    LINE_EVERY_S = 10.0                 # CI logs and nohup files: about one line per 10 s

    def __init__(self, err: Console, label: str, quiet: bool) -> None:
        self.err, self.label, self.quiet = err, label, quiet
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, disable=quiet or not err.is_terminal, transient=True)
        self.tasks: dict[str, Any] = {}
        self.last_line = 0.0

    def __enter__(self) -> ProgressReport:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.err.is_terminal:
            if stage not in self.tasks:
                self.tasks[stage] = self.bar.add_task(f"{self.label} {stage}", total=total or None)
            self.bar.update(self.tasks[stage], completed=done, total=total or None)
            return
        now = time.monotonic()
        if now - self.last_line >= self.LINE_EVERY_S or (total and done == total):
            self.last_line = now
            self.err.print(f"{self.label} {stage} {done}" + (f"/{total}" if total else ""), markup=False,
                           highlight=False)


def scan_with_progress(req: ScanRequest, calib: CalibrationSet | None = None, quiet: bool = False,
                       label: str | None = None, err: Console | None = None,
                       group: Group = SOLO) -> tuple[Report, CalibrationSet | None]:
    """:func:`scan_checkpoint` reporting each stage's progress on stderr (:class:`ProgressReport`), and warnings,
    even when quiet: weight values at the float16 limit, a calibration holding fewer sequences than asked for."""
    err = err or stderr_console()
    with ProgressReport(err, label or Path(req.checkpoint).name, quiet) as progress:
        report, used = scan_checkpoint(req, calib, on_progress=progress, on_warning=lambda text: err.print(
            f"warning: {text}", markup=False, highlight=False, soft_wrap=True), group=group)
    short = None if used is None else describe_shortfall(used.source, used.n_sequences, used.requested, used.seq_len)
    if short is not None:
        err.print(f"warning: {short}", markup=False, highlight=False, soft_wrap=True)
    return report, used


def resolve_target(target: str, req: ScanRequest, calib: CalibrationSet | None = None,
                   quiet: bool = False) -> tuple[Report, CalibrationSet | None]:
    """A report directory is read as is; anything else is a checkpoint, scanned per ``req`` (on ``calib``'s tokens
    when given). Returns the report and the tokens a scan used (None for a report read from disk)."""
    path = Path(target)
    if is_report_dir(path):
        return load_report(path), None
    return scan_with_progress(replace(req, checkpoint=target), calib, quiet)

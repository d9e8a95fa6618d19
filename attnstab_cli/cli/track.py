"""``attnstab track CKPT...``: a training run's checkpoints scanned on one set of tokens (each scan cached by weight
fingerprint) into one long-format time series, shown as per-layer sparklines of θ̄, Π and R (THEORY §12)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from attnstab_cli.cli.options import Json, Quiet
from attnstab_cli.cli.output import handle_errors, print_json, stderr_console, stdout_console
from attnstab_cli.cli.scan_flags import ScanFlags, with_scan_flags
from attnstab_cli.cli.targets import scan_with_progress
from attnstab_cli.errors import UsageError
from attnstab_cli.report.sparklines import render_sparkline
from attnstab_cli.report.cells import format_value
from attnstab_cli.track import (
    TrackEntry, TrackResult, compute_layer_series, discover_checkpoints, read_track_manifest, resolve_steps, run_track,
    track_frame, track_records,
)

SPARK_WIDTH = 40
# (metric, label, fixed scale, number format): θ̄ on its natural [0, 1] so "near 1" reads as such; Π and R on each
# row's range.
VIEW = (("theta_bar", "θ̄", (0.0, 1.0), ".5g"), ("proj_product_layer", "Π", (None, None), ".4g"),
        ("r_ln_mean", "R", (None, None), ".4g"))
SOURCES = {"name": "checkpoint names", "trainer_state": "trainer_state.json", "given": "--steps",
           "order": "argument order (no step in the names or trainer_state.json)"}

TrackOut = Annotated[Path, typer.Option(
    "--out", "-o", help="Track directory: track.parquet, track.json and cache/ (one report per checkpoint). A re-run "
                        "into it scans only new checkpoints and keeps steps not given again.", show_default=False)]
TrackForce = Annotated[bool, typer.Option(
    "--force", help="Start a previous track afresh (other tokens or settings); its cached scans are still reused. "
                    "A directory that is not a track is never written into.")]
Steps = Annotated[Optional[str], typer.Option(
    "--steps", help="Comma-separated steps, one per checkpoint in argument order (instead of the names' steps).")]


def parse_steps(value: str | None) -> list[int] | None:
    """``--steps 100,200,300`` -> ``[100, 200, 300]``; anything but non-negative integers is a usage error."""
    if value is None:
        return None
    try:
        steps = [int(s) for s in value.split(",")]
    except ValueError:
        steps = [-1]
    if any(s < 0 for s in steps):
        raise UsageError(f"--steps must be comma-separated non-negative integers, got {value!r}")
    return steps


@handle_errors
@with_scan_flags
def track(
    checkpoints: Annotated[list[str], typer.Argument(
        help="Checkpoints of one training run (any order), or one directory of checkpoint-<step> / step<N> folders.",
        show_default=False)],
    out: TrackOut,
    force: TrackForce = False,
    steps: Steps = None,
    json_out: Json = False,
    quiet: Quiet = False,
    *, flags: ScanFlags,
) -> None:
    """Scan every checkpoint of a training run on the same tokens into one time series (track.parquet) and show θ̄,
    the projection-norm product Π and R per layer over the steps. Each scan is cached by weight fingerprint."""
    found = discover_checkpoints(checkpoints)
    points = resolve_steps(found, parse_steps(steps))
    read_track_manifest(out, force, found)                  # refuse a foreign directory before any work
    req = flags.request(points[0].checkpoint)
    err = stderr_console()

    def say(text: str) -> None:
        if not quiet:
            err.print(text, highlight=False, soft_wrap=True)

    if found != list(checkpoints):
        say(f"{len(found)} checkpoints in {checkpoints[0]}")
    sources = sorted({SOURCES[p.step_source] for p in points})
    say(f"steps from {', '.join(sources)}")

    def on_entry(e: TrackEntry) -> None:
        say(f"step {e.point.step:>8}  {e.status:<7}  {e.point.checkpoint}")

    result = run_track(points, req, out, force, on_entry=on_entry,
                       scan=lambda r, c: scan_with_progress(r, c, quiet, label=Path(r.checkpoint).name, err=err)[0])
    for e in result.entries:
        if e.status == "kept":
            say(f"step {e.point.step:>8}  kept     {e.point.checkpoint} (from the previous track)")
    for note in result.notes:
        say(f"note: {note}")
    say(f"track written to {out} ({result.table.num_rows} rows, {len(result.entries)} checkpoints)")
    if json_out:
        print_json({**result.manifest, "out": str(out), "notes": result.notes, "rows": track_records(result.table)})
        return
    render_track(result, stdout_console())


def render_track(result: TrackResult, console: Console) -> None:
    """Per layer, one row each for θ̄, Π and R: a sparkline over the steps and the first → last values."""
    steps, series = compute_layer_series(track_frame(result.table), [m for m, *_ in VIEW])
    if not steps:
        console.print("no checkpoints tracked", highlight=False)
        return
    sources = sorted({SOURCES[e.point.step_source].split(" (")[0] for e in result.entries})
    console.print(f"{len(steps)} checkpoints, steps {steps[0]} → {steps[-1]} (from {', '.join(sources)})",
                  highlight=False)
    table = Table(box=box.SIMPLE_HEAD)
    for col, justify in (("layer", "right"), ("", "left"), ("over steps", "left"), ("first → last", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for layer, metrics in series.items():
        for i, (metric, label, (lo, hi), spec) in enumerate(VIEW):
            values = metrics[metric]
            spark = render_sparkline(values, width=SPARK_WIDTH, lo=lo, hi=hi)
            table.add_row(str(layer) if i == 0 else "", label, spark,
                          f"{format_value(values[0], spec)} → {format_value(values[-1], spec)}",
                          end_section=i == len(VIEW) - 1)
    console.print(table)
    for line in ("θ̄: mean over heads of θ, bars on a fixed 0–1 scale.  Π = ‖W_Q‖‖W_K‖‖W_V‖‖W_O‖ (full matrices).",
                 "R: mean token norm at the attention input (r_ln_mean).  Π and R bars span each row's own range.",
                 "Sensitivity proxy S = 2 s θ̄ R² Π (THEORY §12)."):
        console.print(line, highlight=False)

"""``attnstab plot DIR --out FILE``: figures of a saved report, comparison or track as PNG, SVG or one HTML page."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnstab_cli.cli.options import Quiet
from attnstab_cli.cli.output import handle_errors, stderr_console
from attnstab_cli.report.write import write_file_atomic
from attnstab_cli.report.plots import (
    check_plot_target, load_plot_input, render_plot, require_matplotlib,
)


@handle_errors
def plot(
    directory: Annotated[Path, typer.Argument(
        help="A report (attnstab scan --out), comparison (attnstab compare --out) or track (attnstab track --out) "
             "directory.", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="File to write, atomically: .png or .svg (one figure), or .html (a self-contained page "
                            "with the figure inline and the report's identity).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file that attnstab plot "
                                                        "wrote (no other file).")] = False,
    quiet: Quiet = False,
) -> None:
    """Plot θ per head, the per-layer bound tiers and gradient profile, or a comparison's attribution and a track's
    time series (needs the plot extra: pip install 'attnstab\\[plot]')."""
    suffix = check_plot_target(out, force)
    require_matplotlib()
    data = render_plot(load_plot_input(directory), suffix)
    write_file_atomic(out, data)
    if not quiet:
        stderr_console().print(f"plot written to {out}", highlight=False, markup=False, soft_wrap=True)

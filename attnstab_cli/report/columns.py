"""The report's columns with type, unit and description (``attnstab show --columns``): the names gate rules use
(``[heads.|layers.|model.]column``)."""
from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from attnstab_cli.report.read import Report
from attnstab_cli.report.schema import ALL_TABLES


def list_columns(report: Report | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per table, each column's name, type, unit and description; for a ``report``, its own tables and how many of
    their rows hold a value in each column (0: not measured by that scan)."""
    names = [n for n in ALL_TABLES if n in report.tables] if report is not None else list(ALL_TABLES)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = report.tables[name] if report is not None else None
        out[name] = [{"column": c.name, "type": str(c.type), "unit": c.unit, "description": c.description,
                      **({} if rows is None else {"rows_with_value": sum(r.get(c.name) is not None for r in rows)})}
                     for c in ALL_TABLES[name]]
    return out


def render_columns(console: Console, columns: dict[str, list[dict[str, Any]]]) -> None:
    """One table per report table; a rule names a column as ``[table.]column``."""
    for name, cols in columns.items():
        table = Table(title=f"{name}.parquet", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
        counted = bool(cols) and "rows_with_value" in cols[0]
        for heading in ("column", "type", "unit", *(("rows with a value",) if counted else ()), "description"):
            table.add_column(heading, justify="right" if heading == "rows with a value" else "left",
                             overflow="fold")
        for c in cols:
            table.add_row(c["column"], c["type"], c["unit"], *((str(c["rows_with_value"]),) if counted else ()),
                          c["description"])
        console.print(table)


def columns_markdown(columns: dict[str, list[dict[str, Any]]]) -> str:
    """The same lists as GitHub-flavoured Markdown tables."""
    out = []
    for name, cols in columns.items():
        out += [f"### {name}.parquet", "", "| column | type | unit | description |", "|---|---|---|---|"]
        out += [f"| `{c['column']}` | {c['type']} | {c['unit']} | {_escape(c['description'])} |" for c in cols]
        out.append("")
    return "\n".join(out)


def _escape(text: str) -> str:
    """A Markdown table cell: pipes escaped (``|h|`` would otherwise split the cell)."""
    return text.replace("|", "\\|")


__all__ = ["columns_markdown", "list_columns", "render_columns"]

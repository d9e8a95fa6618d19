"""Terminal views of per-head θ: a layers x heads heatmap and the heads worth a look (lowest θ, widest intervals)."""
from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from attnstab_cli.report.cells import MISSING, format_value

# θ bands from red (far from balanced: a logit perturbation moves little mass) to green (θ ≈ 1)
_BANDS = ((0.25, "white on red3"), (0.5, "black on dark_orange"), (0.75, "black on yellow3"),
          (0.95, "black on green3"), (2.0, "black on spring_green1"))


def _style(value: float | None) -> str:
    if value is None:
        return "dim"
    return next((style for bound, style in _BANDS if value < bound), "dim")        # NaN: no band


def theta_heatmap(heads: list[dict[str, Any]], column: str = "theta_mean", width: int = 100) -> Table:
    """Layers as rows, heads as columns, each cell the head's ``column`` on a colour band; values printed while they
    fit ``width`` (up to 18 heads at 100 columns), coloured blocks beyond that (up to 46 heads), then truncated."""
    n_heads = 1 + max(r["head"] for r in heads)
    numbers = 6 + 5 * n_heads <= width
    shown = n_heads if numbers else min(n_heads, (width - 6) // 2)
    title = f"{column} by layer x head" + (f" (first {shown} of {n_heads} heads)" if shown < n_heads else "")
    if not numbers:
        title += "; " + "  ".join(f"<{b:g}" for b, _ in _BANDS[:-1]) + " by colour, red lowest"
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1 if numbers else 0), pad_edge=False)
    table.add_column("layer", justify="right", style="bold")
    for h in range(shown):
        table.add_column(str(h) if numbers else "", justify="center", min_width=4 if numbers else 2)
    by_layer: dict[int, dict[int, Any]] = {}
    for r in heads:
        by_layer.setdefault(r["layer"], {})[r["head"]] = r.get(column)
    for layer in sorted(by_layer):
        vals = [by_layer[layer].get(h) for h in range(shown)]
        cells = [Text((f" {MISSING}  " if v is None else f"{v:.2f}") if numbers else "██",
                      style=_style(v) if numbers else _style(v).split(" on ")[-1]) for v in vals]
        table.add_row(f"{layer} ", *cells)
    return table


def notable_heads(heads: list[dict[str, Any]], n: int = 5) -> Table:
    """The ``n`` heads with the lowest mean θ and the ``n`` with the widest certified interval."""
    table = Table(title="heads worth a look", title_justify="left")
    for col in ("why", "layer", "head", "theta_mean", "theta_p05", "width max", "pmax mean", "entropy"):
        table.add_column(col, justify="right")
    rated = [r for r in heads if r.get("theta_mean") is not None]
    lowest = sorted(rated, key=lambda r: r["theta_mean"])[:n]
    widest = sorted(rated, key=lambda r: -(r.get("theta_width_max") or 0))[:n]
    for why, rows in (("lowest θ", lowest), ("widest", widest)):
        for r in rows:
            table.add_row(why, str(r["layer"]), str(r["head"]), *(format_value(r.get(c), spec) for c, spec in (
                ("theta_mean", ".4f"), ("theta_p05", ".3f"), ("theta_width_max", ".2e"), ("pmax_mean", ".3f"),
                ("entropy_mean", ".3f"))))
    return table

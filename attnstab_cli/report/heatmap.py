"""Terminal views of per-head θ: a layers x heads heatmap and the heads worth a look (lowest θ, widest intervals)."""
from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

# θ bands from red (far from balanced: a logit perturbation moves little mass) to green (θ ≈ 1)
_BANDS = ((0.25, "white on red3"), (0.5, "black on dark_orange"), (0.75, "black on yellow3"),
          (0.95, "black on green3"), (2.0, "black on spring_green1"))


def _style(value: float | None) -> str:
    if value is None:
        return "dim"
    return next(style for bound, style in _BANDS if value < bound)


def theta_heatmap(heads: list[dict[str, Any]], column: str = "theta_mean", max_heads: int = 24) -> Table:
    """Layers as rows, heads as columns, each cell the head's ``column`` value on a colour band."""
    n_heads = 1 + max(r["head"] for r in heads)
    shown = min(n_heads, max_heads)
    table = Table(title=f"{column} by layer x head" + (f" (first {shown} of {n_heads} heads)" if shown < n_heads else ""),
                  title_justify="left", box=None, padding=(0, 1), pad_edge=False)
    table.add_column("layer", justify="right", style="bold")
    for h in range(shown):
        table.add_column(str(h), justify="center", min_width=5)
    by_layer: dict[int, dict[int, Any]] = {}
    for r in heads:
        by_layer.setdefault(r["layer"], {})[r["head"]] = r[column]
    for layer in sorted(by_layer):
        cells = [Text("  -  " if by_layer[layer].get(h) is None else f"{by_layer[layer][h]:.3f}",
                      style=_style(by_layer[layer].get(h))) for h in range(shown)]
        table.add_row(f"{layer} ", *cells)
    return table


def notable_heads(heads: list[dict[str, Any]], n: int = 5) -> Table:
    """The ``n`` heads with the lowest mean θ and the ``n`` with the widest certified interval."""
    table = Table(title="heads worth a look", title_justify="left")
    for col in ("why", "layer", "head", "theta_mean", "theta_p05", "width max", "pmax mean", "entropy"):
        table.add_column(col, justify="right")
    rated = [r for r in heads if r["theta_mean"] is not None]
    lowest = sorted(rated, key=lambda r: r["theta_mean"])[:n]
    widest = sorted(rated, key=lambda r: -(r["theta_width_max"] or 0))[:n]
    for why, rows in (("lowest θ", lowest), ("widest", widest)):
        for r in rows:
            table.add_row(why, str(r["layer"]), str(r["head"]), f"{r['theta_mean']:.4f}", f"{r['theta_p05']:.3f}",
                          f"{r['theta_width_max']:.2e}", f"{r['pmax_mean']:.3f}", f"{r['entropy_mean']:.3f}")
    return table

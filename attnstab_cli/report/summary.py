"""Rich terminal summary of a scan (fits a 100-column terminal)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from attnstab_cli.report.heatmap import notable_heads, theta_heatmap


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def render_summary(console: Console, manifest: dict[str, Any], tables: dict[str, list[dict[str, Any]]]) -> None:
    """Model line, calibration line and the per-layer table."""
    ck, cal = manifest["checkpoint"], manifest["calibration"]
    console.print(f"[bold]{ck['checkpoint']}[/]  {ck['family']}  {ck['n_layers']} layers  d={ck['d_model']}  "
                  f"heads={ck['n_heads']}/{ck['n_kv_heads']}  {ck['norm']} {ck['placement']}", highlight=False)
    console.print(f"calibration: {cal['source']}  {cal['n_sequences']} x {cal['seq_len']} tokens  "
                  f"sha256 {cal['token_sha256'][:12]}", highlight=False)
    table = Table(title="per layer", title_justify="left")
    for col in ("layer", "|h| mean", "|h| max", "R2 attn in", "R2 ffn in", "min var 1", "min var 2"):
        table.add_column(col, justify="right")
    for r in tables["layers"]:
        table.add_row(str(r["layer"]), _fmt(r["r_resid_mean"]), _fmt(r["r_resid_max"]), _fmt(r["r2_in"]),
                      _fmt(r["r2_ffn_in"]), _fmt(r["norm1_min_var"]), _fmt(r["norm2_min_var"]))
    console.print(table)
    heads = tables.get("heads") or []
    if heads:
        console.print(theta_heatmap(heads))
        console.print(notable_heads(heads))
        theta = manifest.get("run", {}).get("theta", {})
        wide = sum(r["theta_wide_rows"] for r in heads)
        unrefined = theta.get("unrefined_rows", 0)
        console.print(f"θ: a certified interval for every row (slack {theta.get('slack')}); "
                      f"{theta.get('refined_rows', 0)} rows refined by A1 or A2+A3; {wide} rows still wider than "
                      f"{theta.get('tol')}" + (f", {unrefined} of them beyond --theta-rows" if unrefined else ""),
                      highlight=False)

"""Figures of a scan report, a comparison or a training track (``attnstab plot``), as PNG, SVG or one HTML page.

What is drawn is what the tables hold, nothing recomputed: per-head θ (the certified lower value theta_mean, THEORY
§3) as a layers x heads heatmap on a fixed 0..1 scale; the per-layer Lipschitz bound tiers 1, 2, 2r and the tier-3
empirical lower bound (THEORY §8) on a log axis; the gradient profile ||dL/dh_l|| (THEORY §9); θ̄ beside the
projection product Π (THEORY §12). A comparison adds the attribution Δlog S = Δlog θ̄ + Δlog Π + 2Δlog R + Δlog 2s
(THEORY §12) as stacked bars that sum to the total; a track draws θ̄, Π and R per layer over training steps.

matplotlib is an optional extra (``attnstab[plot]``): it is imported inside the functions that draw, so the package
imports without it. Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, so no GUI backend
or display is touched and no global figure registry grows.
"""
from __future__ import annotations

import html
import importlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnstab_cli.bounded_json import JsonRefused, loads_strict
from attnstab_cli.errors import InputError, UsageError
from attnstab_cli.input_files import regular_file_present, require_regular_file
from attnstab_cli.report.destination import COMPARE_KIND, TRACK_KIND, WRITER, check_file_destination
from attnstab_cli.track import load_track

FORMATS = (".png", ".svg", ".html")
MATPLOTLIB_MISSING = "attnstab plot needs matplotlib: pip install 'attnstab[plot]'"

TITLE_THETA = "θ (theta_mean) by layer × head"
TITLE_PROJ_HEADS = "projection product Π_h (proj_product) by layer × head"
TITLE_TIERS = "Lipschitz bound tiers per layer"
TITLE_GRAD = "gradient profile ‖∂L/∂h_l‖ (grad_h_in) per layer"
TITLE_THETA_PROJ = "mean θ (theta_bar) and projection product Π per layer"
TITLE_PROJ = "projection product Π (proj_product_layer) per layer"
TITLE_ATTRIBUTION = "attribution of Δlog S per layer (B − A)"
TITLE_THETA_DELTA = "Δθ (theta_mean_delta, B − A) by layer × head"
TITLE_TRACK = "{metric} per layer over training steps"

TIERS = (("lip_layer_weights", "tier 1, weights"), ("lip_layer_calibrated", "tier 2, calibrated"),
         ("lip_layer_refined", "tier 2r, refined"), ("lip_layer_empirical", "tier 3, empirical lower bound"))
# (column, factor, label): the bars of one layer sum to dlog_sens_ln (THEORY §12)
ATTRIBUTION_TERMS = (("dlog_theta", 1.0, "Δlog θ̄ (dlog_theta)"), ("dlog_proj", 1.0, "Δlog Π (dlog_proj)"),
                     ("dlog_r_ln", 2.0, "2 Δlog R (2 dlog_r_ln)"), ("dlog_scale", 1.0, "Δlog 2s (dlog_scale)"))
TRACK_METRICS = (("theta_bar", False), ("proj_product_layer", True), ("r_ln_mean", False))


class MatplotlibMissing(UsageError):
    """``attnstab plot`` without the ``plot`` extra installed (exit 2)."""


@dataclass
class PlotInput:
    """What one DIR holds, as tables: ``layers``/``heads`` (report or comparison) or ``track`` (long format)."""

    kind: str                                     # "report", "compare" or "track"
    path: Path
    title: str                                    # the figure's suptitle and the HTML heading
    identity: dict[str, str]                      # shown on the HTML page: checkpoint(s), token hash prefix, ...
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    heads: pd.DataFrame = field(default_factory=pd.DataFrame)
    track: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)
    weights_only: bool = False


def require_matplotlib() -> None:
    """Fail with the one-line install hint when the ``plot`` extra is missing."""
    try:
        importlib.import_module("matplotlib")
        importlib.import_module("matplotlib.figure")
    except ImportError:
        raise MatplotlibMissing(MATPLOTLIB_MISSING) from None


def check_plot_target(out: Path, force: bool) -> str:
    """The output format (``.png``, ``.svg``, ``.html``) of ``out``; refuse an unknown suffix, a directory, an
    unwritable place, or an existing file unless it is a plot attnstab wrote and ``force`` is given."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out must end in .png, .svg or .html, got {out.name!r}")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; --out names the image or page to write")
    check_file_destination(out, suffix, force)
    return suffix


# ----------------------------------------------------------------------------------------------------------- inputs

def detect_input_kind(path: Path) -> str:
    """``report`` (manifest.json), ``compare`` (compare.json of that kind) or ``track`` (track.json + track.parquet)."""
    if not path.is_dir():
        raise InputError("not a directory: plot reads a report, comparison or track directory", path=path)
    for marker, kind in (("compare.json", COMPARE_KIND), ("track.json", TRACK_KIND)):
        if regular_file_present(path / marker):
            meta = _read_json(path / marker)
            if meta.get("kind") != kind:
                raise InputError(f"{marker} has kind {meta.get('kind')!r}, expected {kind!r}", path=path / marker)
            if kind == TRACK_KIND and not regular_file_present(path / "track.parquet"):
                raise InputError("track directory has no track.parquet", path=path)
            return kind.removeprefix("attnstab-")
    if regular_file_present(path / "manifest.json"):
        return "report"
    raise InputError("not a report, comparison or track directory (no manifest.json, compare.json or track.json)",
                     path=path, hint="plot what attnstab scan/compare/track wrote with --out")


def load_plot_input(path: Path) -> PlotInput:
    """Read DIR as whichever of the three kinds it is (:func:`detect_input_kind`)."""
    kind = detect_input_kind(path)
    return {"report": _load_report, "compare": _load_compare, "track": _load_track}[kind](path)


def _read_json(file: Path) -> dict[str, Any]:
    require_regular_file(file)
    try:
        data = loads_strict(file.read_text(), constants=True)
    except (OSError, UnicodeDecodeError, JsonRefused) as exc:
        raise InputError(f"not valid JSON ({exc})", path=file) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path=file)
    return data


def _read_parquet(file: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    require_regular_file(file)
    try:
        frame = pd.read_parquet(file)
    except Exception as exc:  # pyarrow raises several types for a bad file; all mean "unreadable input"
        raise InputError(f"not a readable Parquet file ({exc})", path=file) from None
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"lacks columns {missing}", path=file)
    return frame


def _hash12(value: Any) -> str | None:
    return str(value)[:12] if value else None


def _load_report(path: Path) -> PlotInput:
    from attnstab_cli.report.read import load_report

    report = load_report(path)
    ck, cal = report.manifest.get("checkpoint") or {}, report.manifest.get("calibration")
    name = ck.get("checkpoint") or str(path)
    token = _hash12((cal or {}).get("token_sha256"))
    title = f"attnstab scan: {name}" + (f" (calibration {token})" if cal else
                                        " (weights-only report: no calibration, so no θ, no tier-2/3 bounds)")
    identity = {"kind": "scan report", "checkpoint": name, "family": ck.get("family"),
                "fingerprint": _hash12(str(ck.get("fingerprint") or "").split(":")[-1]),
                "calibration token sha256": token or "none (weights-only)",
                "calibration source": (cal or {}).get("source"),
                "schema version": str(report.manifest.get("schema_version")),
                "attnstab": (report.manifest.get("tool") or {}).get("version")}
    return PlotInput("report", path, title, _clean(identity), pd.DataFrame(report.layers), pd.DataFrame(report.heads),
                     notes=list(report.notes), weights_only=cal is None)


def _load_compare(path: Path) -> PlotInput:
    meta = _read_json(path / "compare.json")
    layers = _read_parquet(path / "layers.parquet", ("layer",))
    heads = _read_parquet(path / "heads.parquet", ("layer", "head"))
    sides = {s: meta.get(s) if isinstance(meta.get(s), dict) else {} for s in ("a", "b")}
    names = {s: sides[s].get("checkpoint") or sides[s].get("label") or s.upper() for s in sides}
    identity = {"kind": "comparison (B relative to A)", "A": names["a"], "B": names["b"],
                "A calibration token sha256": _hash12(_find_key(sides["a"], "token_sha256")),
                "B calibration token sha256": _hash12(_find_key(sides["b"], "token_sha256"))}
    return PlotInput("compare", path, f"attnstab compare: A = {names['a']} → B = {names['b']}", _clean(identity),
                     layers, heads, notes=_notes(meta, path / "compare.json"))


def _load_track(path: Path) -> PlotInput:
    meta = _read_json(path / "track.json")
    track = load_track(path)
    order = track.drop_duplicates("checkpoint").sort_values("step")
    checkpoints = [str(c) for c in order["checkpoint"]]
    steps = order["step"].dropna()
    span = f"steps {int(steps.min())}–{int(steps.max())}" if len(steps) else "no steps"
    identity = {"kind": "training track", "checkpoints": f"{len(checkpoints)}: " + ", ".join(checkpoints[:6]) +
                (", …" if len(checkpoints) > 6 else ""), "steps": span,
                "calibration token sha256": _hash12(_find_key(meta, "token_sha256"))}
    return PlotInput("track", path, f"attnstab track: {len(checkpoints)} checkpoints, {span}", _clean(identity),
                     track=track, notes=_notes(meta, path / "track.json"))


def _notes(meta: dict[str, Any], file: Path) -> list[str]:
    """The ``notes`` list of a compare.json or track.json (absent: none)."""
    notes = meta.get("notes") or []
    if not isinstance(notes, list):
        raise InputError(f"notes must be a list, got {type(notes).__name__}", path=file)
    return [str(n) for n in notes]


def _find_key(obj: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in nested dicts/lists (formats written by other commands may nest it)."""
    if isinstance(obj, dict):
        if obj.get(key):
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        return next((v for v in (_find_key(x, key) for x in obj) if v), None)
    return None


def _clean(identity: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in identity.items() if v not in (None, "", "None")}


def column(frame: pd.DataFrame, name: str, positive: bool = False) -> np.ndarray:
    """``frame[name]`` as float64 with null -> NaN (all NaN when absent); ``positive`` also blanks values a log axis
    cannot show (<= 0, inf)."""
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan) if positive else values


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _has(frame: pd.DataFrame, name: str) -> bool:
    return bool(np.isfinite(column(frame, name)).any())


# ----------------------------------------------------------------------------------------------------------- panels

def head_grid(heads: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(layer indices [L], values [L, H]) of per-head ``name``; a (layer, head) the table lacks is NaN."""
    layers = np.sort(heads["layer"].dropna().unique()).astype(int)
    n_heads = int(heads["head"].max()) + 1 if len(heads) else 0
    grid = np.full((len(layers), n_heads), np.nan)                     # [L, H]
    row = {layer: i for i, layer in enumerate(layers)}
    for layer, head, value in zip(heads["layer"], heads["head"], column(heads, name)):
        grid[row[int(layer)], int(head)] = value
    return layers, grid


def plot_head_heatmap(ax: Any, heads: pd.DataFrame, name: str, title: str, label: str, *, cmap: str,
                      vmin: float | None = None, vmax: float | None = None, log: bool = False) -> Any:
    """Layers as rows, heads as columns; NaN cells grey; values printed while the grid is small. Returns the image."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    layers, grid = head_grid(heads, name)
    norm = LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps[cmap].with_extremes(bad="lightgrey"), norm=norm,
                      aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=label)
    ax.set(title=title, xlabel="head", ylabel="layer")
    if len(layers) <= 40:
        ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    ax.xaxis.get_major_locator().set_params(integer=True)
    if grid.size <= 100:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                red, green, blue, _ = image.cmap(image.norm(v))   # dark text on light cells, light on dark
                ax.text(j, i, f"{v:.3f}" if not log else f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")
    return image


def plot_theta_heatmap(ax: Any, heads: pd.DataFrame) -> Any:
    """θ per head on the fixed 0..1 scale, so figures of different checkpoints read alike."""
    return plot_head_heatmap(ax, heads, "theta_mean", TITLE_THETA, "theta_mean (certified lower θ)", cmap="viridis",
                             vmin=0.0, vmax=1.0)


def plot_theta_delta_heatmap(ax: Any, heads: pd.DataFrame) -> Any:
    """Δθ per head on a diverging scale symmetric about 0."""
    bound = float(np.nanmax(np.abs(column(heads, "theta_mean_delta")), initial=0.0)) or 1e-12
    return plot_head_heatmap(ax, heads, "theta_mean_delta", TITLE_THETA_DELTA, "theta_mean B − A", cmap="RdBu_r",
                             vmin=-bound, vmax=bound)


def plot_bound_tiers(ax: Any, layers: pd.DataFrame) -> list[Any]:
    """One line per Lipschitz tier present (log scale): tiers 1 ≥ 2 ≥ 2r are upper bounds, tier 3 a lower one."""
    x, lines = column(layers, "layer"), []
    for (name, label), marker in zip(TIERS, "osD^"):
        if _has(layers, name):
            lines += ax.plot(x, column(layers, name, positive=True), marker=marker, label=f"{name} ({label})")
    _integer_x(ax)
    ax.set(title=TITLE_TIERS, xlabel="layer", ylabel="Lipschitz constant (inf,2)", yscale="log")
    ax.legend(fontsize=7)
    return lines


def plot_gradient_profile(ax: Any, layers: pd.DataFrame, names: tuple[str, ...] = ("grad_h_in",)) -> list[Any]:
    """‖∂L/∂h_l‖ per layer (log scale); several columns (e.g. A and B of a comparison) as several lines."""
    x = column(layers, "layer")
    lines = [ax.plot(x, column(layers, n, positive=True), marker="o", label=n)[0] for n in names if _has(layers, n)]
    _integer_x(ax)
    ax.set(title=TITLE_GRAD, xlabel="layer", ylabel="‖∂L/∂h_l‖_F", yscale="log")
    ax.legend(fontsize=7)
    return lines


def plot_theta_and_proj(ax: Any, layers: pd.DataFrame) -> list[Any]:
    """theta_bar (left, 0..1) and proj_product_layer on a twin log axis (right); Π alone for a weights-only report."""
    x = column(layers, "layer")
    if not _has(layers, "theta_bar"):
        line = ax.plot(x, column(layers, "proj_product_layer", positive=True), marker="s", color="C1",
                       label="proj_product_layer")
        _integer_x(ax)
        ax.set(title=TITLE_PROJ, xlabel="layer", ylabel="Π = ‖W_Q‖‖W_K‖‖W_V‖‖W_O‖", yscale="log")
        return line
    theta = ax.plot(x, column(layers, "theta_bar"), marker="o", color="C0", label="theta_bar")
    _integer_x(ax)
    ax.set(title=TITLE_THETA_PROJ, xlabel="layer", ylim=(0.0, 1.05))
    ax.set_ylabel("theta_bar (mean θ over heads)", color="C0")
    twin = ax.twinx()
    proj = twin.plot(x, column(layers, "proj_product_layer", positive=True), marker="s", color="C1",
                     label="proj_product_layer")
    twin.set_yscale("log")
    twin.set_ylabel("proj_product_layer Π", color="C1")
    ax.legend(handles=theta + proj, fontsize=7)
    return theta + proj


def plot_attribution(ax: Any, layers: pd.DataFrame) -> list[Any]:
    """Stacked bars per layer, positive terms stacked up and negative ones down, so each layer's bars sum to the total
    Δlog S (dlog_sens_ln), drawn as a black diamond. A null term draws as 0; a term null everywhere is left out."""
    x = column(layers, "layer")
    up, down, bars = np.zeros(len(x)), np.zeros(len(x)), []
    ax.use_sticky_edges = False                # a zero-height bar atop a stack would otherwise pin the y limit
    for name, factor, label in ATTRIBUTION_TERMS:
        if not _has(layers, name):
            continue
        h = np.nan_to_num(factor * column(layers, name))
        bottom = np.where(h >= 0, up, down)
        bars.append(ax.bar(x, h, bottom=bottom, width=0.6, label=label))
        up, down = up + np.maximum(h, 0), down + np.minimum(h, 0)
    ax.plot(x, column(layers, "dlog_sens_ln"), "D", color="black", label="Δlog S total (dlog_sens_ln)")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(title=TITLE_ATTRIBUTION, xlabel="layer", ylabel="Δlog (B − A)")
    ax.set_xticks(x[np.isfinite(x)])
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return bars


def plot_track_metric(ax: Any, track: pd.DataFrame, metric: str, log: bool = False) -> list[Any]:
    """One line per layer of a per-layer ``metric`` over ``step``: colour runs dark (layer 0) to light (last)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = track[(track["metric"] == metric) & track["layer"].notna() & track["head"].isna()]
    wide = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="last").sort_index()
    layers = [int(v) for v in wide.columns]
    norm, cmap = Normalize(min(layers), max(max(layers), min(layers) + 1)), colormaps["viridis"]
    lines = []
    for layer, name in zip(layers, wide.columns):
        y = wide[name].to_numpy(dtype=float)
        y = np.where(y > 0, y, np.nan) if log else y
        lines += ax.plot(wide.index.to_numpy(), y, marker=".", color=cmap(norm(layer)), label=f"layer {layer}")
    ax.set(title=TITLE_TRACK.format(metric=metric), xlabel="step", ylabel=metric, yscale="log" if log else "linear")
    if len(layers) <= 10:
        ax.legend(fontsize=7, ncols=2)
    else:
        ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label="layer")
    return lines


# ---------------------------------------------------------------------------------------------------------- figures

def build_figure(inp: PlotInput) -> Any:
    """The figure of ``inp``: a grid of the panels its data supports (a ``matplotlib.figure.Figure``)."""
    panels = {"report": _report_panels, "compare": _compare_panels, "track": _track_panels}[inp.kind](inp)
    if not panels:
        raise InputError("nothing to plot: the tables hold none of the plotted metrics", path=inp.path)
    fig = _grid(len(panels))
    for ax, draw in zip(fig.axes, panels):
        draw(ax)
    fig.suptitle(inp.title)
    return fig


def _report_panels(inp: PlotInput) -> list[Any]:
    layers, heads, panels = inp.layers, inp.heads, []
    if _has(heads, "theta_mean"):
        panels.append(lambda ax: plot_theta_heatmap(ax, heads))
    elif _has(heads, "proj_product"):
        panels.append(lambda ax: plot_head_heatmap(ax, heads, "proj_product", TITLE_PROJ_HEADS, "proj_product",
                                                   cmap="magma", log=True))
    if any(_has(layers, name) for name, _ in TIERS):
        panels.append(lambda ax: plot_bound_tiers(ax, layers))
    if _has(layers, "grad_h_in"):
        panels.append(lambda ax: plot_gradient_profile(ax, layers))
    if _has(layers, "theta_bar") or _has(layers, "proj_product_layer"):
        panels.append(lambda ax: plot_theta_and_proj(ax, layers))
    return panels


def _compare_panels(inp: PlotInput) -> list[Any]:
    layers, heads, panels = inp.layers, inp.heads, []
    if any(_has(layers, name) for name, _, _ in ATTRIBUTION_TERMS):
        panels.append(lambda ax: plot_attribution(ax, layers))
    if _has(heads, "theta_mean_delta"):
        panels.append(lambda ax: plot_theta_delta_heatmap(ax, heads))
    if _has(layers, "grad_h_in_a") or _has(layers, "grad_h_in_b"):
        panels.append(lambda ax: plot_gradient_profile(ax, layers, ("grad_h_in_a", "grad_h_in_b")))
    return panels


def _track_panels(inp: PlotInput) -> list[Any]:
    track = inp.track
    per_layer = track[track["layer"].notna() & track["head"].isna()]
    present = set(per_layer["metric"].dropna().unique())
    return [lambda ax, m=m, log=log: plot_track_metric(ax, track, m, log) for m, log in TRACK_METRICS if m in present]


def _grid(n: int) -> Any:
    from matplotlib.figure import Figure

    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.8 * cols, 4.4 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig


# ----------------------------------------------------------------------------------------------------------- output

def render_plot(inp: PlotInput, suffix: str) -> bytes:
    """The figure of ``inp`` as PNG, SVG or a self-contained HTML page (inline SVG, no script, no network)."""
    from matplotlib import rc_context

    fig = build_figure(inp)
    # text stays text in SVG (searchable, selectable), and ids and dates are fixed so reruns give identical files
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "attnstab"}):
        buf = io.BytesIO()
        if suffix == ".png":
            fig.savefig(buf, format="png", dpi=110, metadata={"Software": WRITER})
            return buf.getvalue()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": WRITER})
    svg = buf.getvalue().decode("utf-8")
    return svg.encode("utf-8") if suffix == ".svg" else render_html(inp, svg).encode("utf-8")


def render_html(inp: PlotInput, svg: str) -> str:
    """One page: heading, identity table, notes, and ``svg`` inline (its XML prologue dropped)."""
    from attnstab_cli import __version__

    svg = svg[svg.index("<svg"):]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in inp.identity.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in inp.notes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"generator\" content=\"{WRITER}\">\n"
        f"<title>{html.escape(inp.title)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
        "th{text-align:left;padding-right:1em;font-weight:600}td{font-family:monospace}"
        "svg{max-width:100%;height:auto}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(inp.title)}</h1>\n<table>\n{rows}\n</table>\n"
        + (f"<ul class=\"notes\">{notes}</ul>\n" if notes else "")
        + f"<figure>\n{svg}\n</figure>\n<p><small>attnstab {html.escape(__version__)} · "
          f"{html.escape(str(inp.path))}</small></p>\n</body>\n</html>\n"
    )


__all__ = ["FORMATS", "MATPLOTLIB_MISSING", "MatplotlibMissing", "PlotInput", "build_figure", "check_plot_target",
           "column", "detect_input_kind", "head_grid", "load_plot_input", "plot_attribution", "plot_bound_tiers",
           "plot_gradient_profile", "plot_head_heatmap", "plot_theta_and_proj", "plot_theta_delta_heatmap",
           "plot_theta_heatmap", "plot_track_metric", "render_html", "render_plot", "require_matplotlib"]

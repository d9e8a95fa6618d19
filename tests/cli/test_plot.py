"""``attnstab plot``: every input kind (scan report, weights-only report, comparison, track) to PNG, SVG and HTML; the
drawn data read back from the figure equals the tables; a missing matplotlib, an unknown DIR or suffix and an existing
file without --force are refused with one line and exit 2."""
from __future__ import annotations

import importlib
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import assert_input_error, invoke

from attnstab_cli.report import plots
from attnstab_cli.report.read import load_report

pytest.importorskip("matplotlib")     # in the test extra; without it only the "missing matplotlib" path is testable

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
TOKEN = "0123456789abcdef" * 4
LAYER_METRICS = ("theta_bar", "proj_product_layer", "r_resid_mean", "r_ln_mean", "sens_proxy_ln",
                 "lip_layer_calibrated", "grad_h_in")
DLOGS = ("dlog_theta", "dlog_proj", "dlog_r_ln", "dlog_r_resid", "dlog_scale", "dlog_sens_ln", "dlog_sens_resid")
HEAD_METRICS = ("theta_mean", "theta_p05", "pmax_mean", "entropy_mean", "proj_product")
TITLES = {"report": (plots.TITLE_THETA, plots.TITLE_TIERS, plots.TITLE_GRAD, plots.TITLE_THETA_PROJ),
          "weights": (plots.TITLE_PROJ_HEADS, plots.TITLE_PROJ),
          "compare": (plots.TITLE_ATTRIBUTION, plots.TITLE_THETA_DELTA),
          "track": tuple(plots.TITLE_TRACK.format(metric=m) for m, _ in plots.TRACK_METRICS)}


def _write_compare(root: Path) -> Path:
    """A comparison directory in the format ``attnstab compare --out`` writes; the four attribution terms (θ, Π, 2R,
    scale) sum to dlog_sens_ln, with both signs so the stacking is exercised."""
    rng = np.random.default_rng(1)
    root.mkdir()
    layers = []
    for layer in range(3):
        row = {"layer": layer}
        for m in LAYER_METRICS:
            a, b = rng.uniform(0.5, 2.0, 2)
            row |= {f"{m}_a": a, f"{m}_b": b, f"{m}_delta": b - a}
        row |= {d: float(rng.normal(0, 0.3)) for d in DLOGS}
        row["dlog_sens_ln"] = row["dlog_theta"] + row["dlog_proj"] + 2 * row["dlog_r_ln"] + row["dlog_scale"]
        layers.append(row)
    layers[1]["grad_h_in_a"] = None                               # nulls allowed
    heads = [{"layer": layer, "head": head} | {f"{m}_{s}": float(rng.uniform(-0.2, 0.2)) for m in HEAD_METRICS
                                              for s in ("a", "b", "delta")}
             for layer in range(3) for head in range(4)]
    pq.write_table(pa.Table.from_pylist(layers), root / "layers.parquet")
    pq.write_table(pa.Table.from_pylist(heads), root / "heads.parquet")
    meta = {"kind": "attnstab-compare", "notes": ["a note"],
            "a": {"checkpoint": "ckpt-step200", "label": "A", "token_sha256": TOKEN},
            "b": {"checkpoint": "ckpt-step800", "label": "B", "token_sha256": TOKEN}}
    (root / "compare.json").write_text(json.dumps(meta))
    return root


def _write_track(root: Path) -> Path:
    """A track directory in long format; head-level and model-level rows (value 99) must not be drawn."""
    rng = np.random.default_rng(2)
    root.mkdir()
    rows = []
    for step, name in ((0, "ck-0"), (200, "ck-200"), (800, "ck-800")):
        for layer in range(3):
            rows += [{"step": step, "checkpoint": name, "layer": layer, "head": None, "metric": m,
                      "value": float(rng.uniform(0.1, 1.0))} for m, _ in plots.TRACK_METRICS]
            rows.append({"step": step, "checkpoint": name, "layer": layer, "head": 0, "metric": "theta_bar",
                         "value": 99.0})
        rows.append({"step": step, "checkpoint": name, "layer": None, "head": None, "metric": "theta_bar",
                     "value": 99.0})
    schema = pa.schema([("step", pa.int64()), ("checkpoint", pa.string()), ("layer", pa.int64()),
                        ("head", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.with_metadata({"kind": "attnstab-track"})),
                   root / "track.parquet")
    (root / "track.json").write_text(json.dumps({"kind": "attnstab-track", "calibration": {"token_sha256": TOKEN}}))
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plot")
    scan = invoke("scan", SAMPLES / "gpt2-tiny", "--grad", "--empirical-seqs", "1", "--seq-len", "32", "--batches", "1",
                  "--batch-size", "2", "--out", root / "report", "--quiet")
    assert scan.exit_code == 0, scan.stderr
    weights = invoke("scan", SAMPLES / "gpt2-tiny", "--weights-only", "--out", root / "weights", "--quiet")
    assert weights.exit_code == 0, weights.stderr
    return {"report": root / "report", "weights": root / "weights", "compare": _write_compare(root / "compare"),
            "track": _write_track(root / "track")}


def _axes(fig) -> dict[str, object]:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


@pytest.mark.parametrize("kind", ["report", "weights", "compare", "track"])
@pytest.mark.parametrize("fmt", ["png", "svg", "html"])
def test_every_kind_to_every_format(dirs: dict[str, Path], tmp_path: Path, kind: str, fmt: str) -> None:
    out = tmp_path / f"figure.{fmt}"
    result = invoke("plot", dirs[kind], "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == "" and str(out) in result.stderr
    data = out.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]             # no temporary file left behind
    if fmt == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        return
    text = data.decode("utf-8")
    if fmt == "svg":
        ET.fromstring(data)                                               # well-formed XML
    else:
        assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "</html>" in text
        assert "<script" not in text and "http://" not in text.split("<svg", 1)[0]
        token = TOKEN if kind in ("compare", "track") else (load_report(dirs[kind]).manifest["calibration"] or {}
                                                             ).get("token_sha256", "")
        assert token[:12] in text
        assert {"report": "gpt2-tiny", "weights": "weights-only", "compare": "ckpt-step800",
                "track": "ck-800"}[kind] in text
    for title in TITLES[kind]:
        assert title in text, title


def test_report_figure_draws_the_report(dirs: dict[str, Path]) -> None:
    report = load_report(dirs["report"])
    axes = _axes(plots.build_figure(plots.load_plot_input(dirs["report"])))
    assert set(TITLES["report"]) <= set(axes)
    image = axes[plots.TITLE_THETA].images[0]
    grid = np.ma.filled(image.get_array(), np.nan)
    assert grid.shape == (4, 4) and image.get_clim() == (0.0, 1.0)
    for r in report.heads:
        assert grid[r["layer"], r["head"]] == r["theta_mean"]
    layer = [r["layer"] for r in report.layers]
    lines = {ln.get_label().split()[0]: ln for ln in axes[plots.TITLE_TIERS].get_lines()}
    assert set(lines) == {name for name, _ in plots.TIERS}
    for name, line in lines.items():
        assert list(line.get_xdata()) == layer and list(line.get_ydata()) == [r[name] for r in report.layers]
    assert axes[plots.TITLE_TIERS].get_yscale() == "log"
    (grad,) = axes[plots.TITLE_GRAD].get_lines()
    assert list(grad.get_ydata()) == [r["grad_h_in"] for r in report.layers]
    (theta,) = axes[plots.TITLE_THETA_PROJ].get_lines()
    assert list(theta.get_ydata()) == [r["theta_bar"] for r in report.layers]
    twin = [ax for ax in axes[plots.TITLE_THETA_PROJ].figure.axes if ax.get_ylabel().startswith("proj_product")]
    assert twin[0].get_yscale() == "log"
    assert list(twin[0].get_lines()[0].get_ydata()) == [r["proj_product_layer"] for r in report.layers]


def test_weights_only_report_plots_what_exists_and_says_so(dirs: dict[str, Path]) -> None:
    report = load_report(dirs["weights"])
    fig = plots.build_figure(plots.load_plot_input(dirs["weights"]))
    axes = _axes(fig)
    assert "weights-only" in fig.get_suptitle() and plots.TITLE_THETA not in axes and plots.TITLE_GRAD not in axes
    (proj,) = axes[plots.TITLE_PROJ].get_lines()
    assert list(proj.get_ydata()) == [r["proj_product_layer"] for r in report.layers]
    grid = np.ma.filled(axes[plots.TITLE_PROJ_HEADS].images[0].get_array(), np.nan)
    for r in report.heads:
        assert grid[r["layer"], r["head"]] == r["proj_product"]


def test_compare_bars_are_the_attribution_terms(dirs: dict[str, Path]) -> None:
    layers = pq.read_table(dirs["compare"] / "layers.parquet").to_pylist()
    heads = pq.read_table(dirs["compare"] / "heads.parquet").to_pylist()
    axes = _axes(plots.build_figure(plots.load_plot_input(dirs["compare"])))
    bars = axes[plots.TITLE_ATTRIBUTION].containers
    assert len(bars) == len(plots.ATTRIBUTION_TERMS)
    for container, (name, factor, _) in zip(bars, plots.ATTRIBUTION_TERMS):
        heights = [p.get_height() for p in container.patches]
        assert heights == pytest.approx([factor * r[name] for r in layers], abs=1e-12)
    for i, r in enumerate(layers):                  # the stack of each layer reaches the total
        patches = [c.patches[i] for c in bars]
        top = max(p.get_y() + p.get_height() for p in patches)
        bottom = min(p.get_y() + min(p.get_height(), 0.0) for p in patches)
        positive = sum(max(p.get_height(), 0.0) for p in patches)
        assert top == pytest.approx(positive) and top + bottom == pytest.approx(r["dlog_sens_ln"], abs=1e-12)
    (total,) = [ln for ln in axes[plots.TITLE_ATTRIBUTION].get_lines() if "total" in ln.get_label()]
    assert list(total.get_ydata()) == [r["dlog_sens_ln"] for r in layers]
    image = axes[plots.TITLE_THETA_DELTA].images[0]
    grid = np.ma.filled(image.get_array(), np.nan)
    for r in heads:
        assert grid[r["layer"], r["head"]] == r["theta_mean_delta"]
    lo, hi = image.get_clim()
    assert lo == -hi and hi == max(abs(r["theta_mean_delta"]) for r in heads)


def test_track_lines_are_the_per_layer_series(dirs: dict[str, Path]) -> None:
    rows = pq.read_table(dirs["track"] / "track.parquet").to_pylist()
    axes = _axes(plots.build_figure(plots.load_plot_input(dirs["track"])))
    for metric, log in plots.TRACK_METRICS:
        ax = axes[plots.TITLE_TRACK.format(metric=metric)]
        assert ax.get_yscale() == ("log" if log else "linear")
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {f"layer {i}" for i in range(3)}
        for layer in range(3):
            want = [(r["step"], r["value"]) for r in rows if r["metric"] == metric and r["layer"] == layer
                    and r["head"] is None]
            line = lines[f"layer {layer}"]
            assert list(zip(line.get_xdata(), line.get_ydata())) == want


def test_missing_matplotlib_is_one_line(dirs: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("plot", dirs["report"], "--out", tmp_path / "f.png")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: attnstab plot needs matplotlib: pip install 'attnstab[plot]'"
    assert result.stdout == "" and not (tmp_path / "f.png").exists()


def test_package_imports_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in ("attnstab_cli.report.plots", "attnstab_cli.cli.plot"):
        monkeypatch.delitem(sys.modules, name)
        importlib.import_module(name)
    fresh = sys.modules["attnstab_cli.report.plots"]
    with pytest.raises(fresh.MatplotlibMissing, match=r"pip install 'attnstab\[plot\]'"):
        fresh.require_matplotlib()


def test_unknown_directories_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_input_error(invoke("plot", tmp_path / "empty", "--out", tmp_path / "f.png"),
                       "not a report, comparison or track directory")
    assert_input_error(invoke("plot", tmp_path / "nowhere", "--out", tmp_path / "f.png"), "not a directory")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "compare.json").write_text(json.dumps({"kind": "something-else"}))
    assert_input_error(invoke("plot", tmp_path / "odd", "--out", tmp_path / "f.png"), "expected 'attnstab-compare'")
    assert not (tmp_path / "f.png").exists()


def test_unknown_suffix_is_a_usage_error(dirs: dict[str, Path], tmp_path: Path) -> None:
    assert_input_error(invoke("plot", dirs["report"], "--out", tmp_path / "f.jpg"), ".png, .svg or .html", "f.jpg")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_force_and_must_be_a_plot_of_ours(dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "f.svg"
    out.write_text("old")
    for force in ((), ("--force",)):
        assert_input_error(invoke("plot", dirs["compare"], "--out", out, *force), "not written by attnstab")
    assert out.read_text() == "old"
    out.unlink()
    assert invoke("plot", dirs["report"], "--out", out, "--quiet").exit_code == 0
    assert_input_error(invoke("plot", dirs["compare"], "--out", out), "already exists")
    result = invoke("plot", dirs["compare"], "--out", out, "--force", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    assert plots.TITLE_ATTRIBUTION in out.read_text() and [p.name for p in tmp_path.iterdir()] == ["f.svg"]

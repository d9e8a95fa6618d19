"""``attnstab track`` end to end on the sample run (steps 200 and 800): the time series equals direct scans column by
column, a re-run with one more checkpoint scans only that one (counted at ``run_scan``), the checkpoint-* layout,
the terminal view and ``--json``, and the usage errors (duplicate steps, a foreign output directory)."""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnstab_cli import scan as scan_module
from attnstab_cli.report.read import load_report
from attnstab_cli.track import NUMERIC_COLUMNS, load_track

from helpers import assert_input_error, invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
STEP200, STEP800 = SAMPLES / "gpt2-tiny-step200", SAMPLES / "gpt2-tiny-step800"
FLAGS = ("--empirical-seqs", "0", "--seq-len", "16", "--batches", "1", "--batch-size", "1", "--device", "cpu")


@dataclass
class Tracked:
    out: Path
    first: object
    second: object
    first_calls: list[str]
    second_calls: list[str]
    cache_mtimes: dict[Path, int]
    direct: Path


REAL_RUN_SCAN = scan_module.run_scan


def _counting(calls: list[str]):
    """``run_scan`` that records the name of each checkpoint it scans."""
    def run_scan(model, calib, opts, *rest):
        calls.append(Path(model.files.source).name)
        return REAL_RUN_SCAN(model, calib, opts, *rest)

    return run_scan


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    """Track step 200 alone, then steps 800 and 200 (argument order reversed), counting real scans; plus a direct
    ``scan`` of step 800."""
    root = tmp_path_factory.mktemp("track")
    out, first_calls, second_calls = root / "track", [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scan_module, "run_scan", _counting(first_calls))
        first = invoke("track", STEP200, "--out", out, *FLAGS)
        mtimes = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*")}
        mp.setattr(scan_module, "run_scan", _counting(second_calls))
        second = invoke("track", STEP800, STEP200, "--out", out, *FLAGS)
    direct = root / "direct800"
    result = invoke("scan", STEP800, "--out", direct, "--quiet", *FLAGS)
    assert result.exit_code == 0, result.stderr
    return Tracked(out, first, second, first_calls, second_calls, mtimes, direct)


@pytest.fixture
def no_scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(scan_module, "run_scan", _counting(calls))
    return calls


def _status_lines(stderr: str) -> dict[int, str]:
    """``step N  status  path`` lines of stderr as {step: status}."""
    lines = [ln.split() for ln in stderr.splitlines() if ln.startswith("step ")]
    return {int(parts[1]): parts[2] for parts in lines}


def test_a_rerun_with_one_more_checkpoint_scans_only_that_one(tracked: Tracked) -> None:
    assert tracked.first.exit_code == 0, tracked.first.stderr
    assert tracked.second.exit_code == 0, tracked.second.stderr
    assert tracked.first_calls == ["gpt2-tiny-step200"] and _status_lines(tracked.first.stderr) == {200: "scanned"}
    assert tracked.second_calls == ["gpt2-tiny-step800"]
    assert _status_lines(tracked.second.stderr) == {200: "cached", 800: "scanned"}
    assert "steps from checkpoint names" in tracked.second.stderr
    for path, mtime in tracked.cache_mtimes.items():              # the cached scan was not rewritten
        assert path.stat().st_mtime_ns == mtime, path
    manifest = json.loads((tracked.out / "track.json").read_text())
    assert [(c["step"], c["status"], Path(c["checkpoint"]).name) for c in manifest["checkpoints"]] == [
        (200, "cached", "gpt2-tiny-step200"), (800, "scanned", "gpt2-tiny-step800")]
    assert len(list((tracked.out / "cache").iterdir())) == 2


def test_track_values_equal_a_direct_scan_column_by_column(tracked: Tracked) -> None:
    df = load_track(tracked.out)
    assert list(df.columns) == ["step", "checkpoint", "layer", "head", "metric", "value"]
    assert sorted(df["step"].unique()) == [200, 800]
    assert {"theta_bar", "proj_product_layer", "r_ln_mean", "sens_proxy_ln", "theta_mean", "n_layers"} <= set(
        df["metric"])
    direct = load_report(tracked.direct)
    manifest = json.loads((tracked.out / "track.json").read_text())
    assert manifest["calibration"]["token_sha256"] == direct.manifest["calibration"]["token_sha256"]
    got = {(None if r.layer is None or r.layer != r.layer else int(r.layer),
            None if r.head is None or r.head != r.head else int(r.head), r.metric): r.value
           for r in df[df["step"] == 800].astype(object).where(df.notna(), None).itertuples()}
    expected = {}
    for grain, key in (("layers", ("layer", None)), ("heads", ("layer", "head")), ("model", (None, None))):
        for rec in direct.tables[grain]:
            layer, head = (rec[k] if k else None for k in key)
            expected |= {(layer, head, m): float(rec[m]) for m in NUMERIC_COLUMNS[grain] if rec[m] is not None}
    assert got.keys() == expected.keys() and len(df[df["step"] == 800]) == len(expected)
    for k, value in expected.items():
        assert got[k] == value or (math.isnan(got[k]) and math.isnan(value)), (k, got[k], value)


def test_step_200_rows_are_its_cached_report(tracked: Tracked) -> None:
    manifest = json.loads((tracked.out / "track.json").read_text())
    cached = load_report(tracked.out / manifest["checkpoints"][0]["cache"])
    df = load_track(tracked.out)
    rows = df[(df["step"] == 200) & (df["metric"] == "proj_product_layer")].sort_values("layer")
    assert rows["value"].tolist() == [r["proj_product_layer"] for r in cached.layers]
    heads = df[(df["step"] == 200) & (df["metric"] == "theta_mean")]
    assert len(heads) == len(cached.heads) == 16 and heads["head"].notna().all()


def test_terminal_view_shows_theta_projection_and_radius_per_layer(tracked: Tracked, tmp_path: Path,
                                                                     no_scans: list[str]) -> None:
    out = tmp_path / "track"
    shutil.copytree(tracked.out, out)
    result = invoke("track", STEP200, STEP800, "--out", out, *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert no_scans == [] and _status_lines(result.stderr) == {200: "cached", 800: "cached"}
    lines = result.stdout.splitlines()
    assert "2 checkpoints, steps 200 → 800 (from checkpoint names)" in lines[0]
    assert max(len(ln) for ln in lines) <= 100
    df = load_track(out)
    for layer in range(4):
        pi = df[(df["layer"] == layer) & (df["metric"] == "proj_product_layer")].sort_values("step")["value"]
        first, last = (f"{v:.4g}" for v in pi)
        assert any("Π   ▁█" in ln and f"{first} → {last}" in ln for ln in lines), (layer, result.stdout)
    assert sum("θ̄   ██" in ln for ln in lines) == 4                    # θ̄ ≈ 1 on the fixed 0–1 scale


def test_json_prints_the_long_table(tracked: Tracked, tmp_path: Path, no_scans: list[str]) -> None:
    out = tmp_path / "track"
    shutil.copytree(tracked.out, out)
    result = invoke("track", STEP200, STEP800, "--out", out, "--json", "--quiet", *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "" and no_scans == []
    doc = json.loads(result.stdout)
    assert doc["kind"] == "attnstab-track" and [c["step"] for c in doc["checkpoints"]] == [200, 800]
    df = load_track(out)
    assert len(doc["rows"]) == len(df) and set(doc["rows"][0]) == {"step", "checkpoint", "layer", "head", "metric",
                                                                    "value"}
    theta = [r for r in doc["rows"] if r["metric"] == "theta_bar" and r["step"] == 800 and r["layer"] == 3]
    assert theta == [{"step": 800, "checkpoint": str(STEP800), "layer": 3, "head": None, "metric": "theta_bar",
                      "value": df[(df.step == 800) & (df.layer == 3) & (df.metric == "theta_bar")]["value"].item()}]


def test_a_run_directory_of_checkpoint_folders(tracked: Tracked, tmp_path: Path, no_scans: list[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(STEP800, run / "checkpoint-800")
    os.symlink(STEP200, run / "checkpoint-200")
    out = tmp_path / "track"
    shutil.copytree(tracked.out, out)
    result = invoke("track", run, "--out", out, *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert "2 checkpoints in" in result.stderr and no_scans == []       # same weights: both cached
    df = load_track(out)
    assert sorted(set(zip(df["step"], df["checkpoint"]))) == [(200, str(run / "checkpoint-200")),
                                                               (800, str(run / "checkpoint-800"))]


def test_duplicate_steps_are_a_usage_error(tmp_path: Path, no_scans: list[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(STEP800, run / "checkpoint-200")
    result = invoke("track", STEP200, run / "checkpoint-200", "--out", tmp_path / "t", *FLAGS)
    assert_input_error(result, "duplicate steps", "step 200")
    assert_input_error(invoke("track", STEP200, STEP800, "--steps", "5,5", "--out", tmp_path / "t"), "duplicate")
    assert_input_error(invoke("track", STEP200, STEP800, "--steps", "5,x", "--out", tmp_path / "t"), "--steps")
    assert no_scans == [] and not (tmp_path / "t").exists()


def test_a_foreign_output_directory_is_refused_even_with_force(tmp_path: Path, no_scans: list[str]) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    for force in ((), ("--force",)):
        assert_input_error(invoke("track", STEP200, "--out", out, *FLAGS, *force), "not an attnstab track output",
                           "refused")
    assert no_scans == [] and sorted(p.name for p in out.iterdir()) == ["manifest.json"]

"""``scan --curvature`` end to end: curvature.parquet beside the report, options in the manifest, the summary panel,
and a clear refusal when the model would not fit."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from attnstab_cli.metrics import curvature_scan
from attnstab_cli.report.read import load_report
from helpers import assert_input_error, invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
ARGS = ("--seq-len", "8", "--batches", "1", "--batch-size", "1", "--empirical-seqs", "0", "--curvature",
        "--curvature-iters", "6", "--curvature-probes", "2", "--quiet")


def test_scan_writes_curvature_and_show_renders_it(tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = invoke("scan", SAMPLES / "pythia-tiny", *ARGS, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    table = pq.read_table(out / "curvature.parquet")
    rows = table.to_pylist()
    assert rows == printed["curvature"] == load_report(out).tables["curvature"]
    assert len(rows) == 4 * 10 + 1 and rows[-1]["block"] == "model" and rows[-1]["layer"] is None
    assert all(r["iterations"] <= 6 for r in rows)
    run = printed["manifest"]["run"]
    assert run["curvature"]["max_iter"] == 6 and run["curvature"]["probes"] == 2 and "curvature_s" in run["timings"]
    assert table.schema.field("lambda_max").metadata[b"unit"] == b"loss / param^2"
    shown = invoke("show", out)
    assert shown.exit_code == 0 and "curvature: Hessian of the --grad loss" in shown.stdout
    summary = printed["summary"]["curvature"]
    assert summary[-1]["lambda_max"] == rows[-1]["lambda_max"]
    for s in summary[:-1]:
        mine = [r for r in rows if r["layer"] == s["layer"]]
        assert s["lambda_max"] == max(r["lambda_max"] for r in mine)


def test_a_model_that_does_not_fit_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import attnstab_cli.scan as scan

    monkeypatch.setattr(curvature_scan, "available_memory_bytes", lambda device: 1024)
    monkeypatch.setattr(scan, "LayerStream", None)           # any scan work would now crash (exit 3, not 2)
    result = invoke("scan", SAMPLES / "gpt2-tiny", *ARGS, "--out", tmp_path / "r")
    assert_input_error(result, "--curvature keeps every layer resident", "GiB")
    assert not (tmp_path / "r").exists()


def test_curvature_without_calibration_is_a_usage_error() -> None:
    assert_input_error(invoke("scan", SAMPLES / "gpt2-tiny", "--weights-only", "--curvature"),
                       "--curvature needs calibration text")


def test_bad_hash_mode_and_curvature_dtype_are_usage_errors() -> None:
    assert_input_error(invoke("scan", SAMPLES / "gpt2-tiny", "--hash", "partial"), "--hash must be 'sampled' or 'full'")
    assert_input_error(invoke("scan", SAMPLES / "gpt2-tiny", *ARGS, "--curvature-dtype", "bfloat16"),
                       "--curvature-dtype must be float64 or float32")

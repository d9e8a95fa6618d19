"""``attnstab_cli.track`` and ``report.sparklines`` as a library: steps from names, trainer_state.json and argument
order; the checkpoint-* directory layout; the long-format conversion cell by cell; cache keys; the cache, extension
and refusal rules of ``run_track`` (with a stand-in scan, so no model runs here); sparklines."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from attnstab_cli.calibration.sources import CalibrationSet
from attnstab_cli.cli.targets import build_scan_request
from attnstab_cli.errors import InputError, UsageError
from attnstab_cli.report.read import Report
from attnstab_cli.report.schema import SCHEMA_VERSION, TABLES
from attnstab_cli.report.sparklines import BARS, render_sparkline, resample_values
from attnstab_cli.track import (
    CACHE_DIR, NUMERIC_COLUMNS, TRACK_SCHEMA, TrackPoint, build_long_table, compute_cache_key, compute_layer_series,
    compute_scan_settings, discover_checkpoints, load_track, report_to_long, resolve_steps, run_track, step_from_name,
    step_from_trainer_state, track_frame, track_records,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


# ------------------------------------------------------------------------------------------------------------ steps

@pytest.mark.parametrize("name, step", [
    ("checkpoint-500", 500), ("run/checkpoint-12", 12), ("step1000", 1000), ("gpt2-tiny-step200", 200),
    ("run_step30", 30), ("global_step7", 7), ("model-step9.safetensors", 9), ("checkpoint-4/config.json", 4),
    ("gpt2-tiny", None), ("checkpoint-abc", None), ("tmp-checkpoint-500", None), ("stepping5x", None),
    ("checkpoint-500.bak", None),
])
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(name) == step


def test_step_from_trainer_state(tmp_path: Path) -> None:
    assert step_from_trainer_state(str(tmp_path)) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 1234, "epoch": 1.0}))
    assert step_from_trainer_state(str(tmp_path)) == 1234
    assert step_from_trainer_state(str(tmp_path / "config.json")) == 1234
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(InputError, match="trainer_state.json"):
        step_from_trainer_state(str(tmp_path))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": "9"}))
    with pytest.raises(InputError, match="global_step"):
        step_from_trainer_state(str(tmp_path))


def test_steps_ordered_by_step_not_by_argument(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "trainer_state.json").write_text(json.dumps({"global_step": 900}))
    points = resolve_steps(["a/checkpoint-1000", str(final), "a/checkpoint-200"])
    assert [(p.step, p.step_source) for p in points] == [(200, "name"), (900, "trainer_state"), (1000, "name")]
    assert points[1].checkpoint == str(final)


def test_steps_fall_back_to_argument_order_only_when_no_checkpoint_has_one() -> None:
    points = resolve_steps(["b", "a", "c"])
    assert [(p.checkpoint, p.step, p.step_source) for p in points] == [("b", 0, "order"), ("a", 1, "order"),
                                                                        ("c", 2, "order")]
    with pytest.raises(UsageError, match="no step in the name") as err:
        resolve_steps(["x/checkpoint-5", "final"])
    assert "--steps" in (err.value.hint or "")


def test_explicit_steps_override_names() -> None:
    points = resolve_steps(["m-step5", "final", "first"], [50, 300, 10])
    assert [(p.checkpoint, p.step, p.step_source) for p in points] == [("first", 10, "given"), ("m-step5", 50, "given"),
                                                                        ("final", 300, "given")]
    with pytest.raises(UsageError, match="2 steps for 3 checkpoints"):
        resolve_steps(["a", "b", "c"], [1, 2])


def test_duplicate_steps_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"duplicate steps \(step 200: run/checkpoint-200, other-step200\)") as err:
        resolve_steps(["run/checkpoint-200", "run/checkpoint-300", "other-step200"])
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="duplicate"):
        resolve_steps(["a", "b"], [7, 7])


def test_a_run_directory_expands_to_its_step_folders_in_numeric_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-1000", "checkpoint-200", "checkpoint-30", "runs", ".checkpoint-5", "tmp-checkpoint-7"):
        (run / name).mkdir()
    os.symlink(SAMPLES / "gpt2-tiny-step800", run / "checkpoint-800")      # a symlinked checkpoint counts too
    (run / "checkpoint-9").write_text("a file, not a folder")
    shutil.copy(SAMPLES / "gpt2-tiny" / "config.json", run / "config.json")   # the Trainer's final save: left out
    found = discover_checkpoints([str(run)])
    assert found == [str(run / n) for n in ("checkpoint-30", "checkpoint-200", "checkpoint-800", "checkpoint-1000")]
    assert [p.step for p in resolve_steps(found)] == [30, 200, 800, 1000]
    plain = [str(SAMPLES / "gpt2-tiny-step200")]
    assert discover_checkpoints(plain) == plain                      # a checkpoint without step folders: itself
    assert discover_checkpoints(["x", "y"]) == ["x", "y"]
    with pytest.raises(UsageError):
        discover_checkpoints([])


# ------------------------------------------------------------------------------------------------------ long format

def _synthetic_report(seed: int = 0, n_layers: int = 3, n_heads: int = 2) -> Report:
    """Every schema column filled from a seeded generator; a few cells null (not applicable), one NaN, one inf."""
    rng = np.random.default_rng(seed)

    def record(grain: str, **keys: int) -> dict:
        rec = {}
        for c in TABLES[grain]:
            if c.name in keys:
                rec[c.name] = keys[c.name]
            elif c.type == pa.int64():
                rec[c.name] = int(rng.integers(0, 1000))
            elif c.type == pa.float64():
                rec[c.name] = float(rng.normal())
            elif c.type == pa.bool_():
                rec[c.name] = True
            else:
                rec[c.name] = "next-token CE"
        return rec

    layers = [record("layers", layer=i) for i in range(n_layers)]
    heads = [record("heads", layer=i, head=h, kv_head=h) for i in range(n_layers) for h in range(n_heads)]
    model = [record("model", n_layers=n_layers)]
    layers[0]["ffn_gate_norm"] = None
    heads[1]["bq_norm"] = None
    layers[1]["tightness"] = math.nan
    model[0]["lip_model_weights"] = math.inf
    return Report({"schema_version": SCHEMA_VERSION}, {"layers": layers, "heads": heads, "model": model})


def test_numeric_columns_are_every_int_and_float_column_but_the_keys() -> None:
    assert "kv_head" not in NUMERIC_COLUMNS["heads"] and "layer" not in NUMERIC_COLUMNS["layers"]
    assert {"n_rows", "theta_mean", "proj_product"} <= set(NUMERIC_COLUMNS["heads"])
    assert "n_layers" in NUMERIC_COLUMNS["model"] and "grad_loss_kind" not in NUMERIC_COLUMNS["model"]
    assert "identity_grad_path" not in NUMERIC_COLUMNS["model"]
    n_float = sum(c.type == pa.float64() for cols in TABLES.values() for c in cols)
    assert sum(len(v) for v in NUMERIC_COLUMNS.values()) == n_float + 5   # + n_rows, n_rows_short, wide rows, n_layers,
    assert "attn_window" in NUMERIC_COLUMNS["layers"]                        # attn_window


def test_long_format_matches_the_report_tables_cell_by_cell() -> None:
    report = _synthetic_report()
    rows = report_to_long(report)
    got = {(layer, head, metric): value for layer, head, metric, value in rows}
    assert len(got) == len(rows)                                     # no cell twice
    expected = {}
    for rec in report.layers:
        expected |= {(rec["layer"], None, m): rec[m] for m in NUMERIC_COLUMNS["layers"] if rec[m] is not None}
    for rec in report.heads:
        expected |= {(rec["layer"], rec["head"], m): rec[m] for m in NUMERIC_COLUMNS["heads"] if rec[m] is not None}
    expected |= {(None, None, m): report.model[m] for m in NUMERIC_COLUMNS["model"]}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), key
    assert (0, None, "ffn_gate_norm") not in got and (0, 1, "bq_norm") not in got    # null: left out
    assert math.isnan(got[(1, None, "tightness")]) and got[(None, None, "lip_model_weights")] == math.inf
    assert isinstance(got[(0, 0, "n_rows")], float) and not any(m == "kv_head" for _, _, m, _ in rows)


def test_long_table_roundtrip_through_load_track(tmp_path: Path) -> None:
    from attnstab_cli.track import write_track

    a, b = TrackPoint("run/checkpoint-5", 5, "name"), TrackPoint("run/checkpoint-9", 9, "name")
    table = pa.concat_tables([build_long_table(a, _synthetic_report(0)), build_long_table(b, _synthetic_report(1))])
    assert table.schema == TRACK_SCHEMA
    write_track(tmp_path, table, {"calibration": {"token_sha256": "abc"}})
    df = load_track(tmp_path)
    assert list(df.columns) == ["step", "checkpoint", "layer", "head", "metric", "value"]
    assert str(df["step"].dtype) == "int64" and str(df["layer"].dtype) == "Int64" and str(df["head"].dtype) == "Int64"
    assert str(df["value"].dtype) == "float64" and len(df) == table.num_rows
    model_rows = df[df["metric"] == "n_layers"]
    assert model_rows["layer"].isna().all() and model_rows["head"].isna().all() and list(model_rows["step"]) == [5, 9]
    theta = df[(df["metric"] == "theta_mean") & (df["step"] == 9) & (df["layer"] == 2) & (df["head"] == 1)]
    assert theta["value"].tolist() == [_synthetic_report(1).heads[5]["theta_mean"]]
    assert load_track(tmp_path / "track.parquet").equals(df)
    records = track_records(table)
    assert any(r["metric"] == "tightness" and r["value"] is None for r in records)        # NaN -> JSON null
    json.dumps(records, allow_nan=False)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="not an attnstab track"):
        load_track(tmp_path / "other.parquet")
    with pytest.raises(InputError):
        load_track(tmp_path / "missing")


def test_layer_series_fill_missing_steps_with_none() -> None:
    parts = [build_long_table(TrackPoint(f"c{s}", s, "name"), _synthetic_report(s)) for s in (1, 2, 3)]
    table = pa.concat_tables(parts)
    drop = pc.and_(pc.equal(table["step"], 2), pc.equal(table["metric"], "theta_bar"))
    steps, series = compute_layer_series(track_frame(table.filter(pc.invert(drop))))
    assert steps == [1, 2, 3] and sorted(series) == [0, 1, 2]
    assert series[1]["theta_bar"] == [_synthetic_report(1).layers[1]["theta_bar"], None,
                                      _synthetic_report(3).layers[1]["theta_bar"]]
    assert series[0]["r_ln_mean"][1] == _synthetic_report(2).layers[0]["r_ln_mean"]


# -------------------------------------------------------------------------------------------------------- cache keys

def _calib(*shapes: tuple[int, int]) -> CalibrationSet:
    ids = np.arange(sum(a * b for a, b in shapes)) % 100
    batches, at = [], 0
    for a, b in shapes:
        batches.append(torch.from_numpy(ids[at:at + a * b].reshape(a, b)))
        at += a * b
    return CalibrationSet(tuple(batches), "test", shapes[0][1])


def test_cache_key_depends_on_weights_tokens_and_every_numeric_setting() -> None:
    base_req = build_scan_request("ckpt", device="cpu")
    base = compute_cache_key("fp", compute_scan_settings(base_req, _calib((2, 8))))
    assert base == compute_cache_key("fp", compute_scan_settings(build_scan_request("other", device="cpu"),
                                                                  _calib((2, 8))))     # the path is not the identity
    assert len(base) == 20 and int(base, 16) >= 0
    variants = [
        compute_cache_key("fp2", compute_scan_settings(base_req, _calib((2, 8)))),
        compute_cache_key("fp", compute_scan_settings(base_req, _calib((1, 16)))),     # same bytes, other shape
        compute_cache_key("fp", compute_scan_settings(base_req, _calib((1, 8), (1, 8)))),   # other batch split
    ] + [compute_cache_key("fp", compute_scan_settings(build_scan_request("ckpt", device="cpu", **kw), _calib((2, 8))))
         for kw in ({"dtype": "float64"}, {"grad": True}, {"empirical_seqs": 0}, {"seed": 1}, {"hash_mode": "full"})]
    assert len({base, *variants}) == len(variants) + 1


# ------------------------------------------------------------------------------------- run_track with a stand-in scan

class FakeScan:
    """Stands in for a scan: a small report whose numbers derive from the checkpoint's step, counting calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, req, calib: CalibrationSet) -> Report:
        from attnstab_cli.checkpoints.fingerprint import compute_fingerprint
        from attnstab_cli.model.load import open_model

        self.calls.append(req.checkpoint)
        model = open_model(req.checkpoint)
        step = step_from_name(req.checkpoint) or 0
        report = _synthetic_report(step)
        report.manifest = {"schema_version": SCHEMA_VERSION,
                           "checkpoint": {"fingerprint": compute_fingerprint(model.files.weight_files, req.hash_mode)},
                           "calibration": {"token_sha256": calib.token_hash, "source": calib.source,
                                           "seq_len": calib.seq_len, "batch_sizes": [1]}}
        report.tokens = calib.batches[0].numpy()
        return report


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A Trainer-style run: checkpoint-200 and checkpoint-800 (links to the sample steps)."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(SAMPLES / "gpt2-tiny-step200", run / "checkpoint-200")
    os.symlink(SAMPLES / "gpt2-tiny-step800", run / "checkpoint-800")
    return run


def _new_weights(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with the last weight byte changed: same layout, another fingerprint."""
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (dst / "model.safetensors").write_bytes(bytes(data))
    return dst


def _track(run: Path, out: Path, scan: FakeScan, force: bool = False, seq_len: int = 8, **kw):
    req = build_scan_request(str(run), seq_len=seq_len, batches=1, batch_size=1, device="cpu", **kw)
    return run_track(resolve_steps(discover_checkpoints([str(run)])), req, out, force=force, scan=scan)


def _rows_of_step(result, step: int):
    """One step's rows of a :class:`TrackResult` as :func:`load_track` would return them."""
    return track_frame(result.table).query(f"step == {step}").reset_index(drop=True)


def test_rerun_scans_only_new_checkpoints_and_keeps_rotated_ones(run_dir: Path, tmp_path: Path) -> None:
    out, scan = tmp_path / "track", FakeScan()
    first = _track(run_dir, out, scan)
    assert [e.status for e in first.entries] == ["scanned", "scanned"] and len(scan.calls) == 2
    assert sorted(p.name for p in (out / CACHE_DIR).iterdir()) == sorted(e.key for e in first.entries)
    _new_weights(SAMPLES / "gpt2-tiny-step800", run_dir / "checkpoint-1000")
    second = _track(run_dir, out, scan)
    assert [(e.point.step, e.status) for e in second.entries] == [(200, "cached"), (800, "cached"), (1000, "scanned")]
    assert scan.calls[2:] == [str(run_dir / "checkpoint-1000")]
    df = load_track(out)
    assert sorted(df["step"].unique()) == [200, 800, 1000]
    assert df[df["step"] == 200].reset_index(drop=True).equals(_rows_of_step(first, 200))
    os.unlink(run_dir / "checkpoint-200")                                 # rotated away (save_total_limit)
    third = _track(run_dir, out, scan)
    assert len(scan.calls) == 3 and [e.status for e in third.entries] == ["kept", "cached", "cached"]
    assert load_track(out).equals(df)
    manifest = json.loads((out / "track.json").read_text())
    assert manifest["kind"] == "attnstab-track" and [c["step"] for c in manifest["checkpoints"]] == [200, 800, 1000]
    assert all((out / c["cache"] / "manifest.json").is_file() for c in manifest["checkpoints"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]          # no temporary files left


def test_other_settings_need_force_then_start_afresh(run_dir: Path, tmp_path: Path) -> None:
    out, scan = tmp_path / "track", FakeScan()
    _track(run_dir, out, scan)
    with pytest.raises(UsageError, match="token_sha256, token_shapes") as err:
        _track(run_dir, out, scan, seq_len=16)
    assert "--force" in err.value.hint
    with pytest.raises(UsageError, match="dtype"):
        _track(run_dir, out, scan, dtype="float64")
    os.unlink(run_dir / "checkpoint-200")
    fresh = _track(run_dir, out, scan, force=True, seq_len=16)
    assert [(e.point.step, e.status) for e in fresh.entries] == [(800, "scanned")]           # 200 not carried over
    assert len(list((out / CACHE_DIR).iterdir())) == 3                                     # old scans stay cached


def test_a_step_given_again_with_other_weights_replaces_it(run_dir: Path, tmp_path: Path) -> None:
    out, scan = tmp_path / "track", FakeScan()
    _track(run_dir, out, scan)
    os.unlink(run_dir / "checkpoint-800")
    _new_weights(SAMPLES / "gpt2-tiny-step800", run_dir / "checkpoint-800")
    result = _track(run_dir, out, scan)
    assert [e.status for e in result.entries] == ["cached", "scanned"]
    assert any("step 800: other weights" in n for n in result.notes)


def test_a_foreign_directory_is_refused_and_a_broken_cache_entry_is_rescanned(run_dir: Path, tmp_path: Path) -> None:
    foreign, scan = tmp_path / "mine", FakeScan()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(UsageError, match="not an attnstab track output"):
            _track(run_dir, foreign, scan, force=force)
    assert scan.calls == [] and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "track"
    result = _track(run_dir, out, scan)
    (out / CACHE_DIR / result.entries[0].key / "layers.parquet").write_bytes(b"garbage")
    again = _track(run_dir, out, scan)
    assert [e.status for e in again.entries] == ["scanned", "cached"] and len(scan.calls) == 3
    manifest = json.loads((out / "track.json").read_text())
    (out / "track.json").write_text(json.dumps({**manifest, "checkpoints": [{"step": 200}]}))
    with pytest.raises(InputError, match="malformed track.json") as err:
        _track(run_dir, out, scan)
    assert "--force" in err.value.hint
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        _track(run_dir, tmp_path / "file", scan)


def test_an_interrupted_first_run_resumes_from_its_cache(run_dir: Path, tmp_path: Path) -> None:
    out, scan = tmp_path / "track", FakeScan()

    def fail_on_800(req, calib):
        if req.checkpoint.endswith("checkpoint-800"):
            raise KeyboardInterrupt
        return scan(req, calib)

    with pytest.raises(KeyboardInterrupt):
        _track(run_dir, out, fail_on_800)
    assert [p.name for p in out.iterdir()] == [CACHE_DIR] and len(scan.calls) == 1   # no track written, one cached
    result = _track(run_dir, out, scan)                                              # no --force needed
    assert [e.status for e in result.entries] == ["cached", "scanned"] and len(scan.calls) == 2


# -------------------------------------------------------------------------------------------------------- sparklines

def test_sparkline_spans_the_range() -> None:
    assert render_sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BARS
    assert render_sparkline([7, 0]) == "█▁"
    assert render_sparkline([]) == ""


def test_sparkline_gaps_for_none_nan_and_inf() -> None:
    assert render_sparkline([1.0, None, float("nan"), 3.0, float("inf"), float("-inf")]) == "▁  █  "
    assert render_sparkline([None, float("nan")]) == "  "


def test_sparkline_constant_series_is_mid_height() -> None:
    assert render_sparkline([2.5, 2.5, 2.5]) == "▄▄▄"
    assert render_sparkline([1.0, 1.0 + 1e-15]) == "▄▄"                     # float noise is not a trend
    assert render_sparkline([5.0, None, 5.0]) == "▄ ▄"


def test_sparkline_fixed_scale_and_clipping() -> None:
    assert render_sparkline([0.999, 1.0, 0.998], lo=0.0, hi=1.0) == "███"    # θ near 1 reads as near 1
    assert render_sparkline([0.0, 0.5, 1.0], lo=0.0, hi=1.0) == "▁▅█"
    assert render_sparkline([-3.0, 9.0], lo=0.0, hi=1.0) == "▁█"


def test_sparkline_width_bins_by_mean() -> None:
    assert resample_values([1, 3, 5, 7], 2) == [2.0, 6.0]
    assert resample_values([1, None, None, 7], 2) == [1.0, 7.0]
    assert resample_values([None, None, 1, 2], 2) == [None, 1.5]
    assert resample_values([1, 2], 5) == [1.0, 2.0]
    line = render_sparkline(list(range(1000)), width=40)
    assert len(line) == 40 and line[0] == "▁" and line[-1] == "█" and list(line) == sorted(line)
    with pytest.raises(ValueError):
        resample_values([1.0], 0)


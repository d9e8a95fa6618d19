"""Report schema: the golden schema pins every column (a change must bump the version), and reports written under an
older schema version read back or are refused with the reason (issue 5, item 1)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnstab_cli.errors import InputError
from attnstab_cli.report import read, schema
from attnstab_cli.report.read import load_calibration, load_report
from cli.helpers import assert_input_error, invoke

GOLDEN = Path(__file__).with_name("golden_schema.json")
SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"


def test_schema_matches_the_golden_file() -> None:
    """Changing a column's name, type or unit without bumping SCHEMA_VERSION (and this file) fails here."""
    golden = json.loads(GOLDEN.read_text())
    now = {t: [[c.name, str(c.type), c.unit] for c in cols] for t, cols in schema.ALL_TABLES.items()}
    assert golden["schema_version"] == schema.SCHEMA_VERSION and now == golden["tables"]
    assert schema.SCHEMA_VERSION in schema.SCHEMA_HISTORY
    for cols in schema.ALL_TABLES.values():
        assert all(c.description and c.unit for c in cols)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "r"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--seq-len", "16", "--batches", "2", "--batch-size", "1",
                    "--empirical-seqs", "0", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    return out


def _rewrite_version(src: Path, dst: Path, version: str, drop: dict[str, str] | None = None) -> Path:
    """Copy a report, stamping ``version`` on the manifest and every table (optionally dropping a column)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["schema_version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for name in ("layers", "heads", "model"):
        table = pq.read_table(dst / f"{name}.parquet")
        if drop and name in drop:
            table = table.drop_columns([drop[name]])
        meta = {**(table.schema.metadata or {}), b"schema_version": version.encode()}
        pq.write_table(table.replace_schema_metadata(meta), dst / f"{name}.parquet")
    return dst


def test_round_trip_and_file_metadata(report: Path) -> None:
    loaded = load_report(report)
    manifest = json.loads((report / "manifest.json").read_text())
    assert loaded.manifest == manifest and not loaded.notes
    table = pq.read_table(report / "heads.parquet")
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["schema_version"] == schema.SCHEMA_VERSION and meta["table"] == "heads"
    assert meta["checkpoint_fingerprint"] == manifest["checkpoint"]["fingerprint"]
    assert meta["calibration_token_sha256"] == manifest["calibration"]["token_sha256"]
    assert meta["tool_version"] == manifest["tool"]["version"]
    field = table.schema.field("theta_mean")
    assert field.metadata[b"unit"] == b"1" and b"theta" in field.metadata[b"description"]
    assert loaded.tables["heads"] == table.to_pylist()
    calib = load_calibration(loaded)                       # the exact tokens, split as scanned
    assert [tuple(b.shape) for b in calib.batches] == [(1, 16), (1, 16)]
    assert calib.token_hash == manifest["calibration"]["token_sha256"]


def test_version_1_reads_and_missing_columns_come_back_null(report: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    old = _rewrite_version(report, tmp_path / "v1", "1")
    assert load_report(old).tables["layers"] == load_report(report).tables["layers"]
    monkeypatch.setattr(read, "SCHEMA_HISTORY", {**schema.SCHEMA_HISTORY, "2": {"layers": ("theta_bar",)}})
    older = _rewrite_version(report, tmp_path / "v1b", "1", drop={"layers": "theta_bar"})
    loaded = load_report(older)
    assert all(r["theta_bar"] is None for r in loaded.layers)
    assert loaded.notes == ["layers: schema 1 predates theta_bar (read as null)"]
    assert [r["r_ln_mean"] for r in loaded.layers] == [r["r_ln_mean"] for r in load_report(report).layers]


def test_a_column_missing_without_explanation_is_refused(report: Path, tmp_path: Path) -> None:
    broken = _rewrite_version(report, tmp_path / "v1c", "1", drop={"layers": "theta_bar"})
    with pytest.raises(InputError, match=r"lacks columns \['theta_bar'\]"):
        load_report(broken)


def test_newer_and_unknown_versions_say_why(report: Path, tmp_path: Path) -> None:
    newer = _rewrite_version(report, tmp_path / "v99", "99")
    assert_input_error(invoke("show", newer), "schema version 99", "newer than this attnstab reads")
    odd = _rewrite_version(report, tmp_path / "vx", "beta")
    assert_input_error(invoke("show", odd), "unknown report schema version 'beta'")
    mixed = tmp_path / "mixed"
    shutil.copytree(report, mixed)
    table = pq.read_table(mixed / "model.parquet")
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"schema_version": b"1"}),
                   mixed / "model.parquet")
    assert_input_error(invoke("show", mixed), "model.parquet", "disagrees with manifest.json")


def test_not_a_report_is_an_input_error(tmp_path: Path) -> None:
    assert_input_error(invoke("show", tmp_path), "not a report directory")
    (tmp_path / "manifest.json").write_text("{not json")
    assert_input_error(invoke("show", tmp_path), "manifest.json is not valid JSON")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": "2"}))
    assert_input_error(invoke("show", tmp_path), "manifest.json", "checkpoint must be an object")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": "2",
                                                        "checkpoint": {"checkpoint": "x", "family": "gpt2"}}))
    assert_input_error(invoke("show", tmp_path), "no layers.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "layers.parquet")
    assert_input_error(invoke("show", tmp_path), "layers.parquet", "no schema_version")

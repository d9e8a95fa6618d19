"""A report directory is read as one scan or refused: a table or tokens.npy copied in from another report, a column of
another type, a manifest field of the wrong type are exit 2 naming the file, for every command that reads reports
(show, gate, compare, plot); a manifest without its depth never passes a gate (exit 3); a baseline that cannot be
paired with the target (another family or depth) is exit 2, not a silent pass."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cli.helpers import assert_input_error, invoke
from tiny_models import save_tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
RELATIVE = ("--rule", "sens_proxy_ln growth <= 1000%")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four scans on the same 16 token ids: gpt2-tiny (4 layers), another step of it, a 2-layer GPT-2 and
    llama-tiny (4 layers, another family)."""
    root = tmp_path_factory.mktemp("identity")
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 97, size=(1, 16)))
    save_tiny_model("gpt2", root / "gpt2-2layer")
    sources = {"a": SAMPLES / "gpt2-tiny", "b": SAMPLES / "gpt2-tiny-step200", "two": root / "gpt2-2layer",
               "llama": SAMPLES / "llama-tiny"}
    out = {}
    for name, checkpoint in sources.items():
        result = invoke("scan", checkpoint, "--tokens", ids, "--out", root / name, "--empirical-seqs", "0",
                        "--quiet")
        assert result.exit_code == 0, result.stderr
        out[name] = root / name
    return out


def _copy(report: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "report"
    shutil.copytree(report, dst)
    return dst


def _read(report: Path, command: str, tmp_path: Path, other: Path):
    """Run one reading command on ``report`` (compare pairs it with ``other``)."""
    if command == "show":
        return invoke("show", report)
    if command == "gate":
        return invoke("gate", report, "--no-config", "--rule", "theta_p05 >= 0")
    if command == "compare":
        return invoke("compare", report, other, "--quiet")
    return invoke("plot", report, "--out", tmp_path / "figure.png", "--quiet")


COMMANDS = ("show", "gate", "compare", "plot")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("file, source", [("heads.parquet", "b"), ("layers.parquet", "two"),
                                          ("model.parquet", "llama")])
def test_a_file_from_another_report_is_refused(reports: dict[str, Path], tmp_path: Path, command: str, file: str,
                                               source: str) -> None:
    report = _copy(reports["a"], tmp_path)
    shutil.copy(reports[source] / file, report / file)
    result = _read(report, command, tmp_path, reports["b"])
    assert_input_error(result, str(report / file), "another scan")
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_tokens_of_another_scan_are_refused(reports: dict[str, Path], tmp_path: Path, command: str) -> None:
    report = _copy(reports["a"], tmp_path)
    np.save(report / "tokens.npy", np.load(report / "tokens.npy") + 1)
    result = _read(report, command, tmp_path, reports["b"])
    assert_input_error(result, str(report / "tokens.npy"), "another scan")
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_column_of_another_type_is_refused(reports: dict[str, Path], tmp_path: Path, command: str) -> None:
    report = _copy(reports["a"], tmp_path)
    table = pq.read_table(report / "heads.parquet")
    i = table.schema.get_field_index("theta_mean")
    text = table.set_column(i, pa.field("theta_mean", pa.string()), pc.cast(table["theta_mean"], pa.string()))
    pq.write_table(text.replace_schema_metadata(table.schema.metadata), report / "heads.parquet")
    result = _read(report, command, tmp_path, reports["b"])
    assert_input_error(result, str(report / "heads.parquet"), "column theta_mean is string", "double")
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("section, key, value", [
    ("checkpoint", "n_layers", "4"), ("checkpoint", "n_heads", 0), ("checkpoint", "family", ["gpt2"]),
    ("checkpoint", "attn_input_normalized", "no"),
    ("calibration", "n_sequences", "1"), ("calibration", "token_sha256", 7), ("calibration", "batch_sizes", [0.5]),
    ("run", "theta", []), (None, "checkpoint", [1, 2]), (None, "schema_version", 4), (None, "calibration", "text"),
])
def test_manifest_fields_of_the_wrong_type_are_refused(reports: dict[str, Path], tmp_path: Path, section: str | None,
                                                       key: str, value: object) -> None:
    report = _copy(reports["a"], tmp_path)
    manifest = json.loads((report / "manifest.json").read_text())
    (manifest if section is None else manifest[section])[key] = value
    (report / "manifest.json").write_text(json.dumps(manifest))
    for command in ("show", "gate"):
        assert_input_error(_read(report, command, tmp_path, reports["b"]), str(report / "manifest.json"), key)


def test_a_manifest_without_n_layers_never_passes_a_gate(reports: dict[str, Path], tmp_path: Path) -> None:
    report = _copy(reports["a"], tmp_path)
    manifest = json.loads((report / "manifest.json").read_text())
    del manifest["checkpoint"]["n_layers"]
    (report / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("gate", report, "--no-config", "--rule", "theta_p05 >= 0")
    assert result.exit_code == 3, (result.exit_code, result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "incomplete" in errors[0] and "n_layers" in errors[0]
    assert "Traceback" not in result.stderr and "gate passed" not in result.stdout
    shown = invoke("show", report)
    assert shown.exit_code == 0, shown.stderr
    assert "— layers" in shown.stdout                       # the unknown depth renders as an em dash


@pytest.mark.parametrize("baseline, needle", [("two", "n_layers 2"), ("llama", "family 'llama'")])
def test_a_baseline_that_cannot_be_aligned_exits_2(reports: dict[str, Path], baseline: str, needle: str) -> None:
    result = invoke("gate", reports["a"], "--no-config", "--baseline", reports[baseline], *RELATIVE)
    assert_input_error(result, str(reports[baseline]), needle, "cannot pair")


def test_an_aligned_baseline_still_gates(reports: dict[str, Path]) -> None:
    result = invoke("gate", reports["a"], "--no-config", "--baseline", reports["b"], *RELATIVE, "--json")
    assert result.exit_code in (0, 1), result.stderr
    rule = next(r for r in json.loads(result.stdout)["rules"] if r["kind"] == "growth")
    assert rule["checked"] == 4

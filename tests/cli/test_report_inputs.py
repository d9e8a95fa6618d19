"""Values and inputs around reports, through the CLI: run values out of range (``--seq-len 0``, a seed beyond 64 bits),
report keys outside the manifest's shape, a ``track.json`` of the wrong types, a corrupted track cache (a miss:
rescanned), TOML nested too deeply, the gate's column hint; a calibration cut short is said on stderr and in every
summary view; a tokenizer.json that truncates and pads does not cut the calibration short; and a report whose
nullable columns are null renders in every view (the sliding-window situation of ``--min-keys`` beyond the keys)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from helpers import assert_input_error, invoke

from attnstab_cli.report.read import load_report
from attnstab_cli.report.schema import ALL_TABLES
from attnstab_cli.report.write import write_report

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
TINY = ("--batch-size", "1", "--batches", "1", "--empirical-seqs", "0", "--quiet")
MISSING = "—"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inputs") / "report"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--calib", "random", "--seq-len", "16", "--out", out, *TINY)
    assert result.exit_code == 0, result.stderr
    return out


def _error_line(result) -> str:
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# run values -----------------------------------------------------------------------------------------------------------

def test_seq_len_zero_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--calib", "random", "--seq-len", "0", "--out", out, *TINY)
    assert_input_error(result, "--seq-len must be positive")
    assert not out.exists()


@pytest.mark.parametrize("flag, needle", [("--seq-len", "--seq-len must be positive"),
                                          ("--batch-size", "--batch-size and --batches must be positive"),
                                          ("--batches", "--batch-size and --batches must be positive")])
def test_zero_counts_are_refused_before_any_work(flag: str, needle: str, tmp_path: Path) -> None:
    """Refused before the checkpoint is opened (a missing one is not even looked at) and under --weights-only,
    which builds no tokens, for every scanning command."""
    missing = tmp_path / "no-such-checkpoint"
    for args in (("scan", missing), ("scan", SAMPLES / "gpt2-tiny", "--weights-only"),
                 ("gate", missing, "--no-config", "--rule", "theta_p05 >= 0"), ("compare", missing, missing),
                 ("track", missing, "--out", tmp_path / "t")):
        assert_input_error(invoke(*args, flag, "0", "--quiet"), needle)


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_seed_outside_64_bits_is_refused(tmp_path: Path, seed: int) -> None:
    out = tmp_path / "r"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--calib", "random", "--seq-len", "8", "--seed", str(seed),
                    "--out", out, *TINY)
    assert_input_error(result, "--seed must be an integer from 0 to 2^64 - 1")
    assert not out.exists()


def test_largest_64_bit_seed_scans(tmp_path: Path) -> None:
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--calib", "random", "--seq-len", "8", "--seed", str(2**64 - 1),
                    *TINY)
    assert result.exit_code == 0, result.stderr


# report keys ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", [9, -1])
@pytest.mark.parametrize("command", ["show", "plot"])
def test_head_index_out_of_range_is_refused(report: Path, tmp_path: Path, command: str, head: int) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(report, bad)
    table = pq.read_table(bad / "heads.parquet")
    rows = table.to_pylist()
    rows[5]["head"] = head
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad / "heads.parquet")
    figure = tmp_path / "figure.png"
    result = invoke("show", bad) if command == "show" else invoke("plot", bad, "--out", figure, "--quiet")
    assert_input_error(result, str(bad / "heads.parquet"), f"head index {head} is outside 0..3")
    assert not figure.exists()


# track ----------------------------------------------------------------------------------------------------------------

TRACK_FLAGS = ("--calib", "random", "--seq-len", "8", *TINY)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("track") / "track"
    result = invoke("track", SAMPLES / "gpt2-tiny-step200", SAMPLES / "gpt2-tiny-step800", "--out", out, *TRACK_FLAGS)
    assert result.exit_code == 0, result.stderr
    return out


def test_track_json_with_a_string_step_is_refused(tracked: Path, tmp_path: Path) -> None:
    out = tmp_path / "track"
    shutil.copytree(tracked, out)
    manifest = json.loads((out / "track.json").read_text())
    manifest["checkpoints"][0]["step"] = str(manifest["checkpoints"][0]["step"])
    (out / "track.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = invoke("track", SAMPLES / "gpt2-tiny-step800", "--out", out, *TRACK_FLAGS)
    assert_input_error(result, str(out / "track.json"), "checkpoints[0].step must be a non-negative integer")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_corrupted_cache_entry_is_a_miss_and_rescanned(tracked: Path, tmp_path: Path) -> None:
    out = tmp_path / "track"
    shutil.copytree(tracked, out)
    first, second = (c["cache"] for c in json.loads((out / "track.json").read_text())["checkpoints"])
    shutil.rmtree(out / first)
    (out / first).write_bytes(b"\x00garbage")                                  # the entry is a file
    (out / second / "manifest.json").write_text(json.dumps({"schema_version": "4", "tool": {"name": "attnstab"},
                                                            "checkpoint": 5}))  # a manifest of the wrong types
    result = invoke("track", SAMPLES / "gpt2-tiny-step200", SAMPLES / "gpt2-tiny-step800", "--out", out,
                    *TRACK_FLAGS[:-1])
    assert result.exit_code == 0, result.stderr
    notes = [ln for ln in result.stderr.splitlines() if "scanned again" in ln]
    assert len(notes) == 2 and first in notes[0] and "not a report directory" in notes[0], result.stderr
    assert second in notes[1] and "unreadable" in notes[1]
    for entry in (first, second):
        assert load_report(out / entry).manifest["checkpoint"]["family"] == "gpt2"
    statuses = [c["status"] for c in json.loads((out / "track.json").read_text())["checkpoints"]]
    assert statuses == ["scanned", "scanned"]


# gate config and hint -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000,
                                     "[" * 40 + "]" * 40])
def test_deeply_nested_toml_is_refused(report: Path, tmp_path: Path, nesting: str) -> None:
    config = tmp_path / "gate.toml"
    config.write_text(f"[gate]\nrules = [\"theta_p05 >= 0\"]\ndeep = {nesting}\n")
    result = invoke("gate", report, "--config", config)
    assert_input_error(result, str(config), "nested too deeply")


def test_unknown_column_hint_points_at_show_columns(report: Path) -> None:
    result = invoke("gate", report, "--no-config", "--rule", "theta_p5 >= 0.2")
    assert_input_error(result, "unknown column 'theta_p5'")
    assert "hint: list the columns with: attnstab show --columns" in result.stderr
    assert ".py" not in result.stderr
    listed = invoke("show", "--columns")
    assert listed.exit_code == 0, listed.stderr
    assert "theta_p05" in listed.stdout and "5th percentile of theta_lo" in listed.stdout
    doc = json.loads(invoke("show", report, "--columns", "--json").stdout)
    p05 = next(c for c in doc["heads"] if c["column"] == "theta_p05")
    assert p05["unit"] == "1" and p05["rows_with_value"] == 16
    assert next(c for c in doc["layers"] if c["column"] == "grad_h_in")["rows_with_value"] == 0


# calibration ----------------------------------------------------------------------------------------------------------

def test_a_truncating_padding_tokenizer_does_not_cut_the_corpus_short(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SAMPLES / "gpt2-tiny", ckpt)
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokenizer.enable_truncation(16)
    tokenizer.enable_padding(length=16, pad_id=0)
    tokenizer.save(str(ckpt / "tokenizer.json"))
    assert json.loads((ckpt / "tokenizer.json").read_text())["truncation"]["max_length"] == 16
    result = invoke("scan", ckpt, "--seq-len", "32", "--batch-size", "2", "--batches", "2", "--empirical-seqs", "0",
                    "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    cal = json.loads(result.stdout)["manifest"]["calibration"]
    assert cal["n_sequences"] == cal["n_sequences_requested"] == 4 and cal["source"] == "bundled corpus"
    assert "cut short" not in result.stderr


def test_a_calibration_cut_short_is_said_on_stderr_and_in_every_summary(tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("A few words of text, enough for two short windows and no more than that.\n")
    n_tokens = len(Tokenizer.from_file(str(SAMPLES / "gpt2-tiny" / "tokenizer.json")).encode(
        text.read_text(), add_special_tokens=False).ids)
    seq_len = n_tokens // 2                                          # the text gives 2 windows; 4 are asked for
    out = tmp_path / "r"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--calib", text, "--seq-len", str(seq_len), "--batch-size", "2",
                    "--batches", "2", "--empirical-seqs", "0", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "calibration cut short" in warnings[0] and "of the 4 sequences" in warnings[0]
    doc = json.loads(result.stdout)
    assert doc["manifest"]["calibration"]["n_sequences"] == 2
    assert doc["manifest"]["calibration"]["n_sequences_requested"] == 4
    assert [f["kind"] for f in doc["summary"]["findings"]][0] == "short_calibration"
    assert "(of 4 asked for)" in doc["summary"]["calibration"]
    for fmt in ("rich", "markdown"):
        shown = invoke("show", out, "--format", fmt)
        assert shown.exit_code == 0, shown.stderr
        flat = " ".join(shown.stdout.split())
        assert "calibration cut short" in flat and "(of 4 asked for)" in flat


# rendering nulls ------------------------------------------------------------------------------------------------------

def test_min_keys_beyond_every_row_scans_shows_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--min-keys", "64", "--seq-len", "32", "--batch-size", "2",
                    "--batches", "2", "--empirical-seqs", "0", "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    heads = load_report(out).heads
    assert all(h["theta_width_max"] is None for h in heads) and any(h["theta_wide_rows"] for h in heads)
    for args in ((), ("--detail",), ("--format", "markdown"), ("--json",)):
        shown = invoke("show", out, *args)
        assert shown.exit_code == 0, (args, shown.stderr)
    assert MISSING in invoke("show", out, "--detail").stdout
    pytest.importorskip("matplotlib")
    plotted = invoke("plot", out, "--out", tmp_path / "f.png", "--quiet")
    assert plotted.exit_code == 0 and (tmp_path / "f.png").is_file(), plotted.stderr


def test_a_report_with_every_nullable_column_null_renders_in_every_view(report: Path, tmp_path: Path) -> None:
    src = load_report(report)
    tables = {**src.tables, "curvature": [{"layer": 0, "block": "attn_q"}, {"layer": 1, "block": "ffn_in"},
                                          {"layer": None, "block": "model"}]}
    nulled = {name: [{c.name: r.get(c.name) if c.required else None for c in ALL_TABLES[name]} for r in rows]
              for name, rows in tables.items()}
    out = write_report(tmp_path / "nulls", nulled, src.manifest, tokens=src.tokens)
    for args in ((), ("--detail",), ("--format", "markdown")):
        shown = invoke("show", out, *args)
        assert shown.exit_code == 0, (args, shown.stderr, shown.exception)
        assert MISSING in shown.stdout and "Traceback" not in shown.stderr
    doc = json.loads(invoke("show", out, "--json").stdout)
    for name in nulled:                                    # every table the report holds (experts: MoE only)
        nullable = [c.name for c in ALL_TABLES[name] if not c.required]
        assert doc[name] and all(row[c] is None for row in doc[name] for c in nullable)
    assert doc["summary"]["curvature"][0]["lambda_max"] is None
    pytest.importorskip("matplotlib")
    plotted = invoke("plot", out, "--out", tmp_path / "f.png", "--quiet")
    assert_input_error(plotted, "nothing to plot")
    assert not (tmp_path / "f.png").exists()


def test_a_track_json_with_notes_of_the_wrong_type_is_refused_by_plot(tracked: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "track"
    shutil.copytree(tracked, out)
    manifest = json.loads((out / "track.json").read_text())
    (out / "track.json").write_text(json.dumps({**manifest, "notes": 5}))
    result = invoke("plot", out, "--out", tmp_path / "f.png", "--quiet")
    assert_input_error(result, str(out / "track.json"), "notes must be a list")
    assert not (tmp_path / "f.png").exists()


DEEP = "[" * 5000 + "]" * 5000                  # json.loads alone would raise RecursionError (exit 3)


def test_deeply_nested_json_inputs_are_refused(report: Path, tracked: Path, tmp_path: Path) -> None:
    """A manifest.json, track.json or compare/track document nested thousands deep is bad input (exit 2 naming the
    file) for show, plot and track, never a crash; nothing in the track directory changes."""
    rep = tmp_path / "report"
    shutil.copytree(report, rep)
    (rep / "manifest.json").write_text(DEEP)
    for command in (("show", rep), ("plot", rep, "--out", tmp_path / "fig.png")):
        assert_input_error(invoke(*command), "manifest.json")
    out = tmp_path / "track"
    shutil.copytree(tracked, out)
    (out / "track.json").write_text(DEEP)
    assert_input_error(invoke("plot", out, "--out", tmp_path / "track.png"), "track.json")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = invoke("track", SAMPLES / "gpt2-tiny-step800", "--out", out, *TRACK_FLAGS)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_deeply_nested_trainer_state_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-run"
    shutil.copytree(SAMPLES / "gpt2-tiny-step800", ckpt)
    (ckpt / "trainer_state.json").write_text(DEEP)
    assert_input_error(invoke("track", ckpt, "--out", tmp_path / "track", *TRACK_FLAGS), "trainer_state.json")

"""``attnstab gate`` end to end on the sample checkpoints: every exit code (0 pass, 1 a rule failed, 2 usage or input
error, 3 the scan could not complete), NaN/Inf failing, JUnit XML, GitHub annotations and step summary, the
pyproject lookup, relative rules between two steps of one training run, and a checkpoint TARGET scanned on the
baseline's tokens."""
from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_input_error, invoke
from attnstab_cli.report.read import load_report
from attnstab_cli.report.write import write_report

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
FAST = ("--empirical-seqs", "0", "--quiet")


def _scan(name: str, tokens: Path, out: Path) -> Path:
    result = invoke("scan", SAMPLES / name, "--tokens", tokens, "--out", out, *FAST)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """step200 and step800 of one run on the same tokens (2 x 32), and a copy of step800 whose manifest says it was
    scanned on other tokens (the gate compares the manifests' token hashes; no third scan needed)."""
    root = tmp_path_factory.mktemp("gate")
    ids = torch.randint(5, 1024, (2, 32), generator=torch.Generator().manual_seed(0)).numpy()
    np.save(root / "ids.npy", ids)
    out = {"step200": _scan("gpt2-tiny-step200", root / "ids.npy", root / "step200"),
           "step800": _scan("gpt2-tiny-step800", root / "ids.npy", root / "step800")}
    other = load_report(out["step800"])
    other.manifest["calibration"]["token_sha256"] = "0" * 64
    out["other"] = write_report(root / "other", other.tables, other.manifest)
    return out


@pytest.fixture(autouse=True)
def _no_config_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in an empty directory, so no attnstab.toml / pyproject.toml is picked up by accident."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def gate(*args: object):
    return invoke("gate", *args)


def gate_json(*args: object) -> tuple[int, dict]:
    result = gate(*args, "--json")
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def by_rule(doc: dict) -> dict[str, dict]:
    return {r["rule"]: r for r in doc["rules"]}


# exit 0 and 1 ---------------------------------------------------------------------------------------------------------

def test_passing_rules_exit_0_with_the_worst_row(reports: dict[str, Path]) -> None:
    heads = load_report(reports["step800"]).heads
    worst = min(heads, key=lambda r: r["theta_p05"])
    code, doc = gate_json(reports["step800"], "--rule", "theta_p05 >= 0.2", "-r", "model.n_layers == 4")
    assert code == 0 and doc["passed"] and doc["exit_code"] == 0
    rules = by_rule(doc)
    assert list(rules) == ["finite", "heads.theta_p05 >= 0.2", "model.n_layers == 4"]
    p05 = rules["heads.theta_p05 >= 0.2"]
    assert p05["observed"] == worst["theta_p05"] and p05["at"] == {"layer": worst["layer"], "head": worst["head"]}
    assert p05["checked"] == 16 and rules["finite"]["passed"]


def test_a_failing_rule_exits_1_and_names_the_row(reports: dict[str, Path]) -> None:
    layers = load_report(reports["step800"]).layers
    worst = max(layers, key=lambda r: r["lip_layer_calibrated"])
    assert worst["lip_layer_calibrated"] > 1e4           # the fixture's premise: one layer's bound exceeds 1e4
    result = gate(reports["step800"], "--rule", "layers.lip_layer_calibrated <= 1e4", "--rule", "theta_p05 >= 0.2")
    assert result.exit_code == 1, result.stderr
    assert "gate FAILED: 1 of 3 rules failed" in result.stdout
    assert f"observed {worst['lip_layer_calibrated']:.6g} at layer {worst['layer']}" in result.stdout
    code, doc = gate_json(reports["step800"], "--rule", "layers.lip_layer_calibrated <= 1e4")
    rule = by_rule(doc)["layers.lip_layer_calibrated <= 10000"]
    assert code == 1 and not doc["passed"] and not rule["passed"]
    assert rule["failed"] == sum(r["lip_layer_calibrated"] > 1e4 for r in layers)


def test_unmeasured_column_fails(reports: dict[str, Path]) -> None:
    code, doc = gate_json(reports["step800"], "--rule", "grad_h_in <= 1e9")
    rule = by_rule(doc)["layers.grad_h_in <= 1e+09"]
    assert code == 1 and rule["observed"] is None and "not measured" in rule["message"] and "--grad" in rule["message"]


def test_relative_rules_against_the_earlier_step(reports: dict[str, Path]) -> None:
    a, b = load_report(reports["step200"]).layers, load_report(reports["step800"]).layers
    growth = [rb["sens_proxy_ln"] / ra["sens_proxy_ln"] - 1 for ra, rb in zip(a, b)]
    drop = [1 - rb["theta_bar"] / ra["theta_bar"] for ra, rb in zip(a, b)]
    assert min(growth) > 0.2 and max(growth) < 10 and 0 < max(drop) < 0.05    # the premise of the limits below
    ok = ("--rule", "sens_proxy_ln growth <= 1000%", "--rule", "theta_bar drop <= 5%")
    code, doc = gate_json(reports["step800"], "--baseline", reports["step200"], *ok)
    assert code == 0, doc
    rules = by_rule(doc)
    assert rules["layers.sens_proxy_ln growth <= 1000%"]["observed"] == pytest.approx(max(growth), rel=1e-12)
    assert rules["layers.sens_proxy_ln growth <= 1000%"]["at"] == {"layer": int(np.argmax(growth))}
    assert rules["layers.theta_bar drop <= 5%"]["observed"] == pytest.approx(max(drop), rel=1e-9)
    code, doc = gate_json(reports["step800"], "--baseline", reports["step200"], *ok,
                          "--rule", "sens_proxy_ln growth <= 20%")
    assert code == 1 and [r["rule"] for r in doc["rules"] if not r["passed"]] == [
        "layers.sens_proxy_ln growth <= 20%"]
    assert by_rule(doc)["layers.sens_proxy_ln growth <= 20%"]["failed"] == 4


# NaN / Inf ------------------------------------------------------------------------------------------------------------

def test_nan_or_inf_in_a_table_fails_the_gate(reports: dict[str, Path], tmp_path: Path) -> None:
    src = load_report(reports["step800"])
    src.tables["heads"][5]["theta_p05"] = math.nan
    src.tables["layers"][2]["kappa_v"] = math.inf
    bad = write_report(tmp_path / "bad", src.tables, src.manifest, tokens=src.tokens)
    code, doc = gate_json(bad, "--rule", "model.n_layers == 4")            # the one rule holds
    finite = by_rule(doc)["finite"]
    assert code == 1 and not finite["passed"] and finite["observed"] == 2
    assert "heads.theta_p05 = nan at layer 1 head 1" in finite["message"]
    assert "layers.kappa_v = inf at layer 2" in finite["message"]
    code, doc = gate_json(bad, "--rule", "theta_p05 >= 0.2")               # a NaN row never satisfies a rule
    p05 = by_rule(doc)["heads.theta_p05 >= 0.2"]
    assert code == 1 and not p05["passed"] and p05["observed"] == "NaN" and p05["at"] == {"layer": 1, "head": 1}


# exit 2 ---------------------------------------------------------------------------------------------------------------

def test_unknown_column(reports: dict[str, Path]) -> None:
    assert_input_error(gate(reports["step800"], "--rule", "theta_p5 >= 0.2"), "unknown column 'theta_p5'", "theta_p05")


def test_bad_rule_syntax(reports: dict[str, Path]) -> None:
    assert_input_error(gate(reports["step800"], "--rule", "theta_p05 => 0.2"), "bad rule syntax")


def test_relative_rule_without_baseline(reports: dict[str, Path]) -> None:
    assert_input_error(gate(reports["step800"], "--rule", "sens_proxy_ln growth <= 20%"), "need --baseline")


def test_malformed_toml(reports: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "gate.toml").write_text("[gate\nrules = [")
    assert_input_error(gate(reports["step800"], "--config", tmp_path / "gate.toml"), "gate.toml", "malformed TOML")


def test_no_rules_at_all(reports: dict[str, Path]) -> None:
    assert_input_error(gate(reports["step800"]), "no gate rules")


def test_unreadable_target(tmp_path: Path) -> None:
    result = gate(tmp_path / "missing", "--rule", "theta_p05 >= 0.2", *FAST)
    assert result.exit_code == 2 and "Error:" in result.stderr and "Traceback" not in result.stderr


def test_different_calibration_refused_unless_allowed(reports: dict[str, Path]) -> None:
    rule = ("--rule", "sens_proxy_ln growth <= 1000%")
    assert_input_error(gate(reports["other"], "--baseline", reports["step200"], *rule),
                       "different calibration tokens")
    allowed = gate(reports["other"], "--baseline", reports["step200"], *rule, "--allow-different-calibration")
    assert allowed.exit_code in (0, 1) and "calibration tokens differ" in allowed.stderr


def test_option_conflicts(reports: dict[str, Path], tmp_path: Path) -> None:
    assert_input_error(gate(reports["step800"], "-r", "theta_p05 > 0", "--json", "--github"), "choose one")
    assert_input_error(gate(reports["step800"], "-r", "theta_p05 > 0", "--out", tmp_path / "o"), "already a report")


# exit 3 ---------------------------------------------------------------------------------------------------------------

def test_scan_that_cannot_complete_exits_3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr("attnstab_cli.scan.run_scan", broken)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    result = gate(SAMPLES / "gpt2-tiny", "--rule", "theta_p05 >= 0.2", "--junit-xml", tmp_path / "j.xml",
                  "--github", *FAST)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert "device lost" in result.stderr
    assert result.stdout.startswith("::error title=attnstab gate could not run::the run could not complete")
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    assert "could not run" in (tmp_path / "summary.md").read_text()


def test_incomplete_report_exits_3(reports: dict[str, Path], tmp_path: Path) -> None:
    src = load_report(reports["step800"])
    src.tables["layers"].pop(3)
    short = write_report(tmp_path / "short", src.tables, src.manifest, tokens=src.tokens)
    result = gate(short, "--rule", "theta_p05 >= 0.2")
    assert result.exit_code == 3 and "incomplete" in result.stderr and "missing layers [3]" in result.stderr


def test_checkpoint_with_nan_weights_never_passes(tmp_path: Path) -> None:
    ck = tmp_path / "nan-ckpt"
    shutil.copytree(SAMPLES / "gpt2-tiny", ck)
    weights = load_file(ck / "model.safetensors")
    name = next(k for k in weights if k.endswith("h.0.attn.c_attn.weight"))
    weights[name][0, 0] = math.nan
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    result = gate(ck, "--rule", "theta_p05 >= 0.0", "--seq-len", "16", "--batches", "1", "--batch-size", "1", *FAST)
    assert result.exit_code == 2, (result.exit_code, result.stderr)   # the scan refuses broken weights as bad input
    assert "NaN/Inf" in result.stderr


# outputs ------------------------------------------------------------------------------------------------------------

def test_junit_xml(reports: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "ci" / "gate.xml"
    result = gate(reports["step800"], "-r", "theta_p05 >= 0.2", "-r", "lip_layer_calibrated <= 1e4",
                  "-r", "grad_h_in <= 1", "--junit-xml", path)
    assert result.exit_code == 1
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("tests") == "4" and len(cases) == 4 and suite.get("failures") == "2"
    failed = {c.get("name"): c.find("failure").get("message") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"layers.lip_layer_calibrated <= 10000", "layers.grad_h_in <= 1"}
    assert "at layer" in failed["layers.lip_layer_calibrated <= 10000"]
    assert [p.name for p in path.parent.iterdir()] == ["gate.xml"]          # no temporary left behind


def test_github_annotations_and_step_summary(reports: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rules = ("-r", "theta_p05 >= 0.2", "-r", "lip_layer_calibrated <= 1e4")
    missing = gate(reports["step800"], *rules, "--github")
    assert missing.exit_code == 1 and "GITHUB_STEP_SUMMARY is not set" in missing.stderr
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = gate(reports["step800"], *rules, "--github")
    assert result.exit_code == 1
    errors = [ln for ln in result.stdout.splitlines() if ln.startswith("::")]
    assert errors == [ln for ln in errors if ln.startswith("::error title=attnstab gate%3A ")] and len(errors) == 1
    assert errors[0].startswith("::error title=attnstab gate%3A layers.lip_layer_calibrated <= 10000::")
    text = summary.read_text()
    assert text.startswith("earlier step\n### attnstab gate ❌ failed: 1 of 3 rules")
    assert "| `layers.lip_layer_calibrated <= 10000` |" in text and "**FAIL**" in text
    passed = gate(reports["step800"], "-r", "theta_p05 >= 0.2", "--github")
    assert passed.exit_code == 0 and "::notice title=attnstab gate passed::2 rules passed" in passed.stdout
    assert summary.read_text().count("### attnstab gate") == 2


# config lookup --------------------------------------------------------------------------------------------------------

def test_pyproject_gate_table_in_the_current_directory(reports: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "m"\n\n[tool.attnstab.gate]\nrules = ["theta_p05 >= 0.2"]\n\n'
        '[[tool.attnstab.gate.relative]]\ncolumn = "sens_proxy_ln"\nmax_growth = 0.20\n')
    code, doc = gate_json(reports["step800"], "--baseline", reports["step200"])
    assert code == 1 and doc["config"] == str(tmp_path / "pyproject.toml")
    assert [(r["rule"], r["passed"]) for r in doc["rules"]] == [
        ("finite", True), ("heads.theta_p05 >= 0.2", True), ("layers.sens_proxy_ln growth <= 20%", False)]
    assert by_rule(doc)["layers.sens_proxy_ln growth <= 20%"]["source"] == str(tmp_path / "pyproject.toml")
    code, doc = gate_json(reports["step800"], "--no-config", "-r", "theta_p05 >= 0.2")
    assert code == 0 and doc["config"] is None and len(doc["rules"]) == 2


# checkpoint TARGET ----------------------------------------------------------------------------------------------------

def test_checkpoint_target_is_scanned_on_the_baseline_tokens(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scanned"
    result = gate(SAMPLES / "gpt2-tiny-step800", "--baseline", reports["step200"], "--out", out, "--json",
                  "--rule", "sens_proxy_ln growth <= 1000%", "--empirical-seqs", "0")
    assert result.exit_code == 0, result.stderr
    assert "scanned on the baseline's calibration tokens" in result.stderr
    doc = json.loads(result.stdout)
    base = load_report(reports["step200"])
    assert doc["calibration"]["target"] == doc["calibration"]["baseline"] == \
        base.manifest["calibration"]["token_sha256"]
    scanned, ref = load_report(out), load_report(reports["step800"])       # --out kept the scan, tokens included
    assert np.array_equal(scanned.tokens, base.tokens)
    for got, want in zip(scanned.layers, ref.layers):
        assert got["sens_proxy_ln"] == pytest.approx(want["sens_proxy_ln"], rel=1e-9)

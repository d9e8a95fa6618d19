"""``gate`` at the experts level and ``compare`` of mixture-of-experts reports, through the CLI on two tiny Mixtral
scans (seeds 0 and 1, the same tokens): absolute and relative expert rules that pass (exit 0) and fail (exit 1) at
the worst (layer, expert), an experts rule on a dense report failing as not measured, an experts table missing rows
refused as incomplete (exit 3), and the routing columns and per-expert deltas of ``compare``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attnstab_cli.report.read import load_report
from attnstab_cli.report.write import write_report
from cli.helpers import invoke
from tiny_models import save_tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
FAST = ("--empirical-seqs", "0", "--quiet", "--batch-size", "2")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_gate")
    np.save(root / "ids.npy", torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(0)).numpy())
    out = {}
    for name, path, seed in (("a", root / "mixtral_a", 0), ("b", root / "mixtral_b", 1), ("dense", None, 0)):
        if path is not None:
            save_tiny_model("mixtral", path, seed=seed)
        result = invoke("scan", path or SAMPLES / "llama-tiny", "--tokens", root / "ids.npy", *FAST,
                        "--out", root / f"report_{name}")
        assert result.exit_code == 0, result.stderr
        out[name] = root / f"report_{name}"
    return out


@pytest.fixture(autouse=True)
def _no_config_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _experts(report: Path) -> list[dict]:
    return pq.read_table(report / "experts.parquet").to_pylist()


def _gate(*args: object) -> tuple[int, dict]:
    result = invoke("gate", *args, "--json")
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    return result.exit_code, {r["rule"]: r for r in json.loads(result.stdout)["rules"]}


def test_absolute_expert_rules_pass_and_fail_at_the_worst_expert(reports: dict[str, Path]) -> None:
    rows = _experts(reports["a"])
    low = min(rows, key=lambda r: r["load_share"])
    high = max(rows, key=lambda r: r["lip_expert_weights"])
    code, rules = _gate(reports["a"], "--rule", "experts.load_share <= 1", "-r", "expert.token_slots >= 0")
    assert code == 0 and rules["experts.load_share <= 1"]["checked"] == len(rows) == 2 * 6
    assert rules["experts.load_share <= 1"]["observed"] == max(r["load_share"] for r in rows)
    assert rules["experts.token_slots >= 0"]["passed"]
    code, rules = _gate(reports["a"], "--rule", f"load_share > {low['load_share']}",
                        "-r", f"lip_expert_weights < {high['lip_expert_weights']}")
    assert code == 1
    share = rules[f"experts.load_share > {low['load_share']:g}"]
    assert not share["passed"] and share["at"] == {"layer": low["layer"], "expert": low["expert"]}
    assert share["failed"] == sum(r["load_share"] == low["load_share"] for r in rows)
    ball = rules[f"experts.lip_expert_weights < {high['lip_expert_weights']:g}"]
    assert not ball["passed"] and ball["at"] == {"layer": high["layer"], "expert": high["expert"]}
    text = invoke("gate", reports["a"], "--rule", f"load_share > {low['load_share']}")
    assert text.exit_code == 1 and f"layer {low['layer']} expert {low['expert']}" in text.stdout


def test_relative_expert_rules_against_a_baseline(reports: dict[str, Path]) -> None:
    a, b = ({(r["layer"], r["expert"]): r for r in _experts(reports[k])} for k in ("a", "b"))
    growth = {k: (b[k]["lip_expert_weights"] - a[k]["lip_expert_weights"]) / a[k]["lip_expert_weights"] for k in a}
    worst = max(growth, key=growth.get)
    assert growth[worst] > 0
    code, rules = _gate(reports["b"], "--baseline", reports["a"],
                        "--rule", f"lip_expert_weights growth <= {100 * growth[worst] * 1.01}%")
    assert code == 0
    code, rules = _gate(reports["b"], "--baseline", reports["a"],
                        "--rule", f"lip_expert_weights growth <= {100 * growth[worst] * 0.99}%")
    verdict = next(v for k, v in rules.items() if k.startswith("experts.lip_expert_weights growth"))
    assert code == 1 and verdict["at"] == {"layer": worst[0], "expert": worst[1]}
    assert verdict["observed"] == pytest.approx(growth[worst], rel=1e-12)


def test_an_expert_rule_on_a_dense_report_is_not_measured(reports: dict[str, Path]) -> None:
    code, rules = _gate(reports["dense"], "--rule", "experts.load_share <= 1")
    verdict = rules["experts.load_share <= 1"]
    assert code == 1 and not verdict["passed"] and "no experts table" in verdict["message"]


def test_a_report_missing_expert_rows_is_incomplete(reports: dict[str, Path], tmp_path: Path) -> None:
    report = load_report(reports["a"])
    report.tables["experts"] = report.tables["experts"][:-1]
    broken = write_report(tmp_path / "broken", report.tables, report.manifest)
    result = invoke("gate", broken, "--rule", "experts.load_share <= 1")
    assert result.exit_code == 3 and "experts table has 11 rows for 12" in result.stderr


def test_compare_shows_routing_columns_and_per_expert_deltas(reports: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("compare", reports["a"], reports["b"], "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    la, lb = (load_report(reports[k]).layers for k in ("a", "b"))
    for row, ra, rb in zip(data["layers"], la, lb):
        for col in ("router_margin_min", "expert_load_max", "gate_theta_mean"):
            assert (row[f"{col}_a"], row[f"{col}_b"]) == (ra[col], rb[col])
            assert row[f"{col}_delta"] == rb[col] - ra[col]
    a, b = ({(r["layer"], r["expert"]): r for r in _experts(reports[k])} for k in ("a", "b"))
    assert [(r["layer"], r["expert"]) for r in data["experts"]] == list(a)
    for r in data["experts"]:
        k = (r["layer"], r["expert"])
        for col in ("load_share", "lip_expert_weights", "gate_norm", "up_norm", "out_norm"):
            assert (r[f"{col}_a"], r[f"{col}_b"], r[f"{col}_delta"]) == (a[k][col], b[k][col], b[k][col] - a[k][col])
    text = invoke("compare", reports["a"], reports["b"], "--out", tmp_path / "cmp").stdout
    assert "routing of mixture-of-experts layers" in text and "experts that moved most" in text
    written = pq.read_table(tmp_path / "cmp" / "experts.parquet").to_pylist()
    assert written == data["experts"]


def test_compare_with_a_dense_report_notes_the_missing_experts(reports: dict[str, Path]) -> None:
    result = invoke("compare", reports["a"], reports["dense"], "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert "experts" not in data and any("experts are not compared" in n for n in data["notes"])
    assert all(r["router_margin_min_b"] is None and r["router_margin_min_a"] is not None for r in data["layers"])

"""Gate evaluation on hand-built reports: the worst row is the one reported, null rows are "not applicable" but an
all-null column fails, relative changes align rows on their keys, and NaN/Inf never pass."""
from __future__ import annotations

import math
from typing import Any

import pytest

from attnstab_cli.errors import ScanFailure, UsageError
from attnstab_cli.gate.evaluate import check_finite, describe, evaluate_gate, evaluate_rule, format_observed
from attnstab_cli.gate.inputs import check_calibration, check_complete, check_rules_need
from attnstab_cli.gate.rules import parse_rule
from attnstab_cli.report.read import Report


def make_report(layers: list[dict[str, Any]], heads: list[dict[str, Any]] | None = None,
                model: dict[str, Any] | None = None, tokens: str | None = "aaa", n_heads: int = 2) -> Report:
    manifest = {"checkpoint": {"n_layers": len(layers), "n_heads": n_heads},
                "calibration": None if tokens is None else {"token_sha256": tokens}}
    if heads is None:
        heads = [{"layer": r["layer"], "head": h} for r in layers for h in range(n_heads)]
    return Report(manifest, {"layers": layers, "heads": heads, "model": [model or {"n_layers": len(layers)}]})


def layers(column: str, values: list[Any]) -> list[dict[str, Any]]:
    return [{"layer": i, column: v} for i, v in enumerate(values)]


@pytest.mark.parametrize("rule, passed, observed, layer", [
    ("lip_layer_calibrated <= 10", True, 7.0, 2),
    ("lip_layer_calibrated <= 5", False, 7.0, 2),
    ("lip_layer_calibrated < 7", False, 7.0, 2),
    ("lip_layer_calibrated >= 1", True, 3.0, 0),
    ("lip_layer_calibrated > 3", False, 3.0, 0),
    ("lip_layer_calibrated == 4", False, 7.0, 2),       # == reports the row furthest from the limit
])
def test_absolute_rule_reports_the_worst_row(rule: str, passed: bool, observed: float, layer: int) -> None:
    report = make_report(layers("lip_layer_calibrated", [3.0, 5.0, 7.0, None]))
    v = evaluate_rule(parse_rule(rule), report)
    assert (v.passed, v.observed, v.at) == (passed, observed, {"layer": layer})
    assert v.checked == 3 and "1 row null: not applicable" in v.message


def test_head_rule_names_layer_and_head() -> None:
    heads = [{"layer": layer, "head": h, "theta_p05": 0.9 - 0.3 * layer - 0.5 * h} for layer in range(2)
             for h in range(2)]                              # 0.9, 0.4, 0.6, 0.1
    v = evaluate_rule(parse_rule("theta_p05 >= 0.2"), make_report(layers("theta_bar", [1, 1]), heads))
    assert not v.passed and v.failed == 1 and v.checked == 4 and v.at == {"layer": 1, "head": 1}
    assert v.observed == pytest.approx(0.1)
    assert "observed 0.1 at layer 1 head 1; 1 of 4 rows fail" in describe(v)


def test_all_null_column_is_not_measured_and_fails() -> None:
    v = evaluate_rule(parse_rule("grad_h_in <= 1e9"), make_report(layers("grad_h_in", [None, None])))
    assert not v.passed and v.observed is None and "not measured" in v.message and "--grad" in v.message
    weights_only = make_report(layers("r2_in", [None]), tokens=None)
    v = evaluate_rule(parse_rule("r2_in <= 1e9"), weights_only)
    assert not v.passed and "weights-only" in v.message


def test_nan_row_fails_the_rule_and_the_finite_check() -> None:
    report = make_report(layers("kappa_v", [1.0, math.nan, 2.0]))
    v = evaluate_rule(parse_rule("kappa_v <= 1e9"), report)
    assert not v.passed and math.isnan(v.observed) and v.at == {"layer": 1}
    finite = check_finite(report)
    assert not finite.passed and finite.observed == 1 and "layers.kappa_v = nan at layer 1" in finite.message


def test_inf_anywhere_fails_finite_even_when_the_rule_holds() -> None:
    report = make_report(layers("kappa_v", [1.0, 2.0]), model={"n_layers": 2, "lip_model_weights": math.inf})
    verdicts = evaluate_gate([parse_rule("kappa_v <= 10")], report)
    assert [v.rule for v in verdicts] == ["finite", "layers.kappa_v <= 10"]
    assert [v.passed for v in verdicts] == [False, True]
    assert "model.lip_model_weights = inf at model" in verdicts[0].message
    assert format_observed(verdicts[0]) == "1 non-finite"


def test_documented_overflow_of_the_bound_products_is_not_a_failure() -> None:
    """lip_model_* is +inf once the product overflows float64 (a 32-layer model easily does); with a finite log
    beside it that is the documented encoding, so it passes — a NaN there, or an infinite log, still fails."""
    ok = make_report(layers("kappa_v", [1.0]), model={"n_layers": 1, "lip_model_weights": math.inf,
                                                       "log_lip_model_weights": 812.0})
    v = check_finite(ok)
    assert v.passed and "model.lip_model_weights (log 812) overflow" in v.message
    for model in ({"lip_model_weights": math.nan, "log_lip_model_weights": 812.0},
                  {"lip_model_weights": math.inf, "log_lip_model_weights": math.inf},
                  {"lip_model_calibrated": -math.inf, "log_lip_model_calibrated": 3.0}):
        assert not check_finite(make_report(layers("kappa_v", [1.0]), model={"n_layers": 1, **model})).passed, model


def test_finite_passes_on_finite_values_and_counts_them() -> None:
    report = make_report(layers("kappa_v", [1.0, None, 2.0]), model={"n_layers": 3, "depth_budget": 4.0})
    v = check_finite(report)
    assert v.passed and v.checked == 3 and v.failed == 0


def test_growth_aligns_rows_on_layer() -> None:
    base = make_report(layers("sens_proxy_ln", [1.0, 2.0, 4.0]))
    target = make_report(list(reversed(layers("sens_proxy_ln", [1.1, 3.0, 4.0]))))   # row order must not matter
    v = evaluate_rule(parse_rule("sens_proxy_ln growth <= 20%"), target, base)
    assert not v.passed and v.at == {"layer": 1} and v.observed == pytest.approx(0.5) and v.failed == 1
    assert format_observed(v) == "+50%"
    assert evaluate_rule(parse_rule("sens_proxy_ln growth <= 50%"), target, base).passed


def test_drop_and_zero_or_negative_baselines() -> None:
    base = make_report(layers("sens_log_proj", [-2.0, 0.0, 1.0]))
    target = make_report(layers("sens_log_proj", [-2.05, 0.0, 0.96]))    # drops of 2.5% (of |-2|), 0, 4%
    drop = evaluate_rule(parse_rule("sens_log_proj drop <= 5%"), target, base)
    assert drop.passed and drop.observed == pytest.approx(0.04) and drop.at == {"layer": 2}
    tight = evaluate_rule(parse_rule("sens_log_proj drop <= 3%"), target, base)
    assert not tight.passed and tight.failed == 1 and tight.at == {"layer": 2}
    grew = make_report(layers("sens_log_proj", [-2.0, 1e-9, 1.0]))
    g = evaluate_rule(parse_rule("sens_log_proj growth <= 1000%"), grew, base)
    assert not g.passed and g.observed == math.inf and g.at == {"layer": 1}     # zero baseline: no growth allowed


def test_relative_with_nan_or_missing_rows() -> None:
    base = make_report(layers("theta_bar", [1.0, 1.0]))
    target = make_report(layers("theta_bar", [1.0, math.nan, 1.0]))
    v = evaluate_rule(parse_rule("theta_bar drop <= 1%"), target, base)
    assert not v.passed and math.isnan(v.observed) and "1 row of the target without a baseline row" in v.message
    none = make_report(layers("theta_bar", [None, None]))
    assert "baseline report" in evaluate_rule(parse_rule("theta_bar drop <= 1%"), target, none).message


def test_relative_rule_needs_a_baseline() -> None:
    rules = [parse_rule("theta_p05 > 0"), parse_rule("sens_proxy_ln growth <= 20%")]
    with pytest.raises(UsageError, match="need --baseline"):
        check_rules_need(rules, has_baseline=False)
    check_rules_need(rules, has_baseline=True)
    with pytest.raises(UsageError, match="no gate rules"):
        check_rules_need([], has_baseline=True)


def test_incomplete_reports_are_scan_failures() -> None:
    report = make_report(layers("theta_bar", [1.0, 1.0, 1.0]))
    check_complete(report, "target")
    report.tables["layers"].pop(1)
    with pytest.raises(ScanFailure, match=r"missing layers \[1\]") as info:
        check_complete(report, "target")
    assert info.value.exit_code == 3
    short_heads = make_report(layers("theta_bar", [1.0]), heads=[{"layer": 0, "head": 0}])
    with pytest.raises(ScanFailure, match="heads table has 1 rows"):
        check_complete(short_heads, "baseline")


def test_different_tokens_refuse_relative_rules_unless_allowed() -> None:
    a, b = make_report(layers("theta_bar", [1.0]), tokens="aaa"), make_report(layers("theta_bar", [1.0]), tokens="bbb")
    rel = [parse_rule("theta_bar drop <= 1%")]
    with pytest.raises(UsageError, match="different calibration tokens"):
        check_calibration(a, b, rel, allow_different=False)
    assert "differ" in check_calibration(a, b, rel, allow_different=True)[0]
    assert check_calibration(a, a, rel, allow_different=False) == []
    assert "not used" in check_calibration(a, b, [parse_rule("theta_bar > 0")], allow_different=False)[0]

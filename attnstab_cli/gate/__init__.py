"""``attnstab gate``: pass/fail rules on a scan report for CI (absolute limits, growth/drop against a baseline
report, and an implicit all-values-finite rule), with JUnit XML and GitHub Actions outputs."""
from attnstab_cli.gate.config import collect_rules, find_config, load_config
from attnstab_cli.gate.evaluate import Verdict, check_finite, evaluate_gate, evaluate_rule
from attnstab_cli.gate.inputs import (
    check_aligned, check_calibration, check_complete, check_rules_need,
)
from attnstab_cli.gate.rules import Rule, parse_rule, relative_rule

__all__ = ["Rule", "Verdict", "check_aligned", "check_calibration", "check_complete", "check_finite",
           "check_rules_need", "collect_rules", "evaluate_gate", "evaluate_rule", "find_config",
           "load_config", "parse_rule", "relative_rule"]

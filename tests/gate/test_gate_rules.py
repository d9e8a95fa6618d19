"""Gate rule parsing (flags and TOML): levels inferred from the schema, relative limits as fractions, and every kind of
bad rule refused with a usage error (exit 2) that names the problem."""
from __future__ import annotations

from pathlib import Path

import pytest

from attnstab_cli.errors import InputError, UsageError
from attnstab_cli.gate.config import collect_rules, find_config, load_config
from attnstab_cli.gate.rules import Rule, parse_rule


@pytest.mark.parametrize("text, expected", [
    ("theta_p05 >= 0.2", Rule("heads", "theta_p05", ">=", 0.2)),
    ("theta_p05>=0.2", Rule("heads", "theta_p05", ">=", 0.2)),
    ("layers.lip_layer_calibrated <= 1e4", Rule("layers", "lip_layer_calibrated", "<=", 1e4)),
    ("lip_layer_calibrated < 1e4", Rule("layers", "lip_layer_calibrated", "<", 1e4)),
    ("model.n_layers == 4", Rule("model", "n_layers", "==", 4.0)),
    ("depth_budget > -inf", Rule("model", "depth_budget", ">", float("-inf"))),
    ("heads.layer >= 0", Rule("heads", "layer", ">=", 0.0)),
    ("sens_proxy_ln growth <= 20%", Rule("layers", "sens_proxy_ln", "<=", 0.2, "growth")),
    ("sens_proxy_ln growth <= 0.2", Rule("layers", "sens_proxy_ln", "<=", 0.2, "growth")),
    ("heads.theta_mean drop <= 2.5%", Rule("heads", "theta_mean", "<=", 0.025, "drop")),
    ("load_share <= 0.5", Rule("experts", "load_share", "<=", 0.5)),          # only the experts table has it
    ("expert.lip_expert_weights growth <= 10%", Rule("experts", "lip_expert_weights", "<=", 0.1, "growth")),
    ("experts.expert >= 0", Rule("experts", "expert", ">=", 0.0)),
])
def test_parse_rule(text: str, expected: Rule) -> None:
    assert parse_rule(text) == expected


def test_canonical_text_names_the_level() -> None:
    assert parse_rule("theta_p05 >= 0.2").text == "heads.theta_p05 >= 0.2"
    assert parse_rule("sens_proxy_ln growth <= 12.5%").text == "layers.sens_proxy_ln growth <= 12.5%"
    assert parse_rule("lip_model_calibrated <= 1e30").text == "model.lip_model_calibrated <= 1e+30"


@pytest.mark.parametrize("text, needles", [
    ("theta_p5 >= 0.2", ["unknown column 'theta_p5'", "theta_p05"]),
    ("layers.theta_p05 >= 0.2", ["unknown column 'theta_p05' in the layers table", "it is in heads"]),
    ("blocks.theta_p05 >= 0.2", ["unknown level 'blocks'"]),
    ("layer >= 0", ["'layer' is in the heads, layers and experts tables"]),
    ("experts.theta_p05 >= 0.2", ["unknown column 'theta_p05' in the experts table", "it is in heads"]),
    ("layers.load_share <= 0.5", ["unknown column 'load_share' in the layers table", "it is in experts"]),
    ("theta_p05 => 0.2", ["bad rule syntax"]),
    ("theta_p05 >= ", ["bad rule syntax"]),
    ("theta_p05 >= abc", ["bad number 'abc'"]),
    ("theta_p05 >= nan", ["NaN is not a limit"]),
    ("theta_p05 >= 20%", ["percentage", "growth"]),
    ("sens_proxy_ln growth >= 20%", ["must use <="]),
    ("sens_proxy_ln drop <= -5%", ["non-negative"]),
    ("grad_loss_kind >= 1", ["not numeric"]),
])
def test_bad_rules_are_usage_errors(text: str, needles: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        parse_rule(text)
    assert info.value.exit_code == 2
    for needle in needles:
        assert needle in info.value.message, (needle, info.value.message)


PYPROJECT = """
[project]
name = "x"

[tool.attnstab.gate]
rules = ["theta_p05 >= 0.2", "layers.lip_layer_calibrated <= 1e4"]

[[tool.attnstab.gate.relative]]
column = "sens_proxy_ln"
max_growth = 0.20

[[tool.attnstab.gate.relative]]
column = "theta_mean"
level = "heads"
max_drop = 0.05
max_growth = 1
"""


def test_pyproject_gate_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    rules = load_config(tmp_path / "pyproject.toml")
    src = str(tmp_path / "pyproject.toml")
    assert rules == [Rule("heads", "theta_p05", ">=", 0.2, source=src),
                     Rule("layers", "lip_layer_calibrated", "<=", 1e4, source=src),
                     Rule("layers", "sens_proxy_ln", "<=", 0.2, "growth", src),
                     Rule("heads", "theta_mean", "<=", 1.0, "growth", src),
                     Rule("heads", "theta_mean", "<=", 0.05, "drop", src)]


def test_attnstab_toml_wins_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "attnstab.toml").write_text('[gate]\nrules = ["model.n_layers == 4"]\n')
    assert find_config(tmp_path) == tmp_path / "attnstab.toml"
    rules, used = collect_rules(["theta_p05 > 0"], None, tmp_path)
    assert used == tmp_path / "attnstab.toml"
    assert [r.text for r in rules] == ["heads.theta_p05 > 0", "model.n_layers == 4"]
    assert collect_rules(["theta_p05 > 0"], None, tmp_path, discover=False) == (
        [Rule("heads", "theta_p05", ">", 0.0)], None)


def test_pyproject_without_gate_table_is_not_a_config(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[gate]\nrules = ["theta_p05 > 0"]\n')
    assert find_config(tmp_path) is None        # a top-level [gate] counts only in attnstab.toml
    assert collect_rules([], None, tmp_path) == ([], None)


@pytest.mark.parametrize("body, needle", [
    ("[gate\nrules = [", "malformed TOML"),
    ('[gate]\nrule = ["theta_p05 > 0"]\n', "unknown key(s) ['rule']"),
    ('[gate]\nrules = "theta_p05 > 0"\n', "must be a list of strings"),
    ('[gate]\nrules = ["theta_p5 > 0"]\n', "unknown column 'theta_p5'"),
    ('[[gate.relative]]\ncolumn = "sens_proxy_ln"\n', "needs max_growth or max_drop"),
    ('[[gate.relative]]\ncolumn = "sens_proxy_ln"\nmax_grow = 0.2\n', "unknown key(s) ['max_grow']"),
    ('[[gate.relative]]\ncolumn = "sens_proxy_ln"\nmax_growth = "20%"\n', "non-negative number"),
    ('[[gate.relative]]\ncolumn = "sens_proxy_ln"\nmax_growth = true\n', "non-negative number"),
    ('[other]\nx = 1\n', "no [tool.attnstab.gate] or [gate] table"),
])
def test_bad_config_files_are_input_errors(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(body)
    with pytest.raises(InputError) as info:
        load_config(path)
    assert info.value.exit_code == 2 and needle in info.value.message and str(path) in info.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such config file"):
        collect_rules([], tmp_path / "absent.toml", tmp_path)

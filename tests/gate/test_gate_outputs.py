"""Gate outputs for CI: JUnit XML (parsed back), GitHub workflow-command escaping and the Markdown step summary."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from attnstab_cli.gate.evaluate import Verdict
from attnstab_cli.gate.github import annotation, build_annotations, build_step_summary
from attnstab_cli.gate.junit import build_junit
from attnstab_cli.report.write import write_file_atomic


def verdict(rule: str, passed: bool, message: str = "m", at: dict | None = None, observed: float | None = 1.0,
            kind: str = "absolute") -> Verdict:
    return Verdict(rule, kind, "layers", "x", passed, observed, 2.0, at, 4, 0 if passed else 1, message, "--rule")


VERDICTS = [verdict("finite", True, "all 9 values finite", kind="finite", observed=0.0),
            verdict("layers.x <= 2", False, "1 of 4 rows fail", {"layer": 3}, 5.5),
            verdict("layers.y growth <= 20%", False, "not measured: a|b", None, None, "growth"),
            verdict("layers.z >= 0", True, "all 4 rows pass", {"layer": 0}, 0.5)]


def test_junit_one_testcase_per_rule_failures_marked() -> None:
    root = ET.fromstring(build_junit(VERDICTS, {"target": "ck", "baseline": None}))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "2"
    assert root.get("failures") == "2" and suite.get("errors") == "0"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [v.rule for v in VERDICTS]
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["layers.x <= 2", "layers.y growth <= 20%"]
    assert failed[0].find("failure").get("message") == "layers.x <= 2: observed 5.5 at layer 3; 1 of 4 rows fail"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props == {"target": "ck"}


def test_junit_error_when_the_gate_could_not_run() -> None:
    suite = ET.fromstring(build_junit([], {"target": "ck"}, error="scan failed")).find("testsuite")
    assert suite.get("errors") == "1" and suite.get("tests") == "1" and suite.get("failures") == "0"
    assert suite.find("testcase/error").get("message") == "scan failed"


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gate.xml"
    write_file_atomic(path, "one")
    write_file_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["gate.xml"]


def test_annotation_escaping() -> None:
    line = annotation("error", "attnstab gate: a, b", "50% up\nnext: line")
    assert line == "::error title=attnstab gate%3A a%2C b::50%25 up%0Anext: line"


def test_annotations_only_for_failures_or_one_notice() -> None:
    lines = build_annotations(VERDICTS, "ck")
    assert len(lines) == 2 and all(ln.startswith("::error title=attnstab gate%3A layers.") for ln in lines)
    assert "observed 5.5 at layer 3" in lines[0] and "(target ck)" in lines[0]
    ok = build_annotations([VERDICTS[0], VERDICTS[3]], "ck")
    assert ok == ["::notice title=attnstab gate passed::2 rules passed on ck"]


def test_step_summary_table() -> None:
    md = build_step_summary(VERDICTS, "ck", "base", ["note <1>"])
    lines = md.splitlines()
    assert lines[0] == "### attnstab gate ❌ failed: 2 of 4 rules"
    rows = [ln for ln in lines if ln.startswith("| `")]
    assert len(rows) == 4
    assert rows[1] == "| `layers.x <= 2` | 5.5 | layer 3 | **FAIL** | 1 of 4 rows fail |"
    assert "not measured: a\\|b" in rows[2]                 # a pipe cannot split the cell
    assert "- note &lt;1>" in lines and "baseline: `base`" in md
    assert build_step_summary([VERDICTS[0]], "ck", None, []).startswith("### attnstab gate ✅ passed: 1 rules")

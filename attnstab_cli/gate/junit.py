"""JUnit XML for CI test reporters: one ``<testcase>`` per gate rule (``finite`` included), a failed rule as
``<failure>``, a gate that could not run (exit 2 or 3) as one ``<error>`` testcase. Written atomically (a temporary
sibling, then one rename), so a CI step never reads half a file.

The layout follows the de-facto schema read by Jenkins, GitLab and the GitHub test-report actions:
``testsuites > testsuite(name, tests, failures, errors, skipped) > testcase(classname, name)``.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from attnstab_cli.gate.evaluate import Verdict, describe

SUITE = "attnstab gate"


def build_junit(verdicts: list[Verdict], properties: dict[str, str | None], error: str | None = None) -> str:
    """The XML document. ``error`` (the gate could not run) replaces the verdicts with one erroring testcase."""
    failures = 0 if error else sum(not v.passed for v in verdicts)
    tests = 1 if error else len(verdicts)
    counts = {"tests": str(tests), "failures": str(failures), "errors": str(int(error is not None)), "skipped": "0"}
    root = ET.Element("testsuites", {"name": SUITE, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **counts,
                                              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    props = ET.SubElement(suite, "properties")
    for name, value in properties.items():
        if value is not None:
            ET.SubElement(props, "property", {"name": name, "value": value})
    if error is not None:
        case = ET.SubElement(suite, "testcase", {"classname": "attnstab.gate", "name": "gate"})
        ET.SubElement(case, "error", {"message": error, "type": "GateError"}).text = error
    for v in [] if error is not None else verdicts:
        case = ET.SubElement(suite, "testcase", {"classname": f"attnstab.gate.{v.level or 'all'}", "name": v.rule})
        if not v.passed:
            ET.SubElement(case, "failure", {"message": describe(v), "type": "GateRuleFailed"}).text = \
                f"{describe(v)}\nrule from: {v.source}"
        ET.SubElement(case, "system-out").text = describe(v)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


__all__ = ["build_junit"]

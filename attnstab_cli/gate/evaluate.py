"""Evaluate gate rules on a report (and a baseline report) into one verdict per rule, worst row first.

* ``finite`` (always, listed first): every floating-point value of every table of the target is finite; a NaN or
  Inf anywhere fails the gate, whatever the other rules say — except the documented overflow of the model-level
  bound products to +inf while their logs stay finite (``OVERFLOW_TWINS``).
* absolute ``[level.]column OP limit``: holds when it holds on every row that measured the column (null means "not
  applicable", STYLE.md "Reports"); the worst row is the one closest to, or furthest past, the limit. A NaN row fails.
* relative ``column growth|drop <= f``: per row aligned on the level's keys (``layer``, ``(layer, head)``, or the
  single model row; ``(layer, expert)`` in the experts table), ``target <= baseline + f |baseline|`` (growth) or
  ``target >= baseline - f |baseline|`` (drop).

A rule whose column is null in every row fails as "not measured": a gate never passes on a metric it did not see
(an experts rule on a model without experts, too).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from attnstab_cli.errors import UsageError
from attnstab_cli.gate.rules import KEYS, LEVELS, OPS, Rule, format_percent
from attnstab_cli.report.read import Report
from attnstab_cli.report.schema import ALL_TABLES

Key = tuple[int, ...]
MAX_LISTED = 3          # non-finite values named in the finite verdict's message
# Products the schema reports as +inf when they overflow float64, with their log beside them: +inf there is a
# documented overflow (deep models reach it easily), not a broken number, as long as the log is finite.
OVERFLOW_TWINS = {"lip_model_weights": "log_lip_model_weights", "lip_model_calibrated": "log_lip_model_calibrated"}


@dataclass
class Verdict:
    """The outcome of one rule. ``observed`` is the worst row's value (absolute), its relative change as a fraction
    (growth: positive = grew; drop: positive = dropped), or the count of non-finite values (finite); ``at`` is the
    worst row's key (``{"layer": 2, "head": 1}``; ``{}`` for the model row; None when nothing was evaluated)."""

    rule: str
    kind: str
    level: str | None
    column: str | None
    passed: bool
    observed: float | None
    limit: float | None
    at: dict[str, int] | None
    checked: int
    failed: int
    message: str
    source: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: non-finite numbers as the strings ``NaN``, ``Infinity``, ``-Infinity`` (strict JSON
        has no literal for them)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}


def evaluate_gate(rules: list[Rule], target: Report, baseline: Report | None = None) -> list[Verdict]:
    """The implicit ``finite`` verdict, then one verdict per rule, in the order given."""
    return [check_finite(target)] + [evaluate_rule(rule, target, baseline) for rule in rules]


def evaluate_rule(rule: Rule, target: Report, baseline: Report | None = None) -> Verdict:
    if not rule.relative:
        return _absolute(rule, target)
    if baseline is None:
        raise UsageError(f"rule {rule.text!r} compares with a baseline: give --baseline REPORT")
    return _relative(rule, target, baseline)


def check_finite(report: Report) -> Verdict:
    """Every floating-point value of every table finite (nulls are "not applicable" and skipped)."""
    checked, bad, overflow = 0, [], []
    for level in LEVELS:
        columns = [c.name for c in ALL_TABLES[level] if pa.types.is_floating(c.type)]
        for row in report.tables.get(level) or []:
            for col in columns:
                x = row.get(col)
                if x is None:
                    continue
                checked += 1
                twin = row.get(OVERFLOW_TWINS.get(col, ""))
                if x == math.inf and twin is not None and math.isfinite(twin):
                    overflow.append(f"{level}.{col} (log {twin:.4g})")
                elif not math.isfinite(x):
                    bad.append(f"{level}.{col} = {x} at {format_at(_at(level, _key(level, row)))}")
    message = (f"all {checked} values finite" if not bad else
               f"{len(bad)} non-finite value(s): {'; '.join(bad[:MAX_LISTED])}"
               + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""))
    if overflow:
        message += f" ({', '.join(overflow)} overflow float64 as documented; their logs are finite)"
    return Verdict("finite", "finite", None, None, not bad, float(len(bad)), 0.0, None, checked, len(bad), message,
                   "implicit")


def _absolute(rule: Rule, report: Report) -> Verdict:
    rows = report.tables.get(rule.level) or []
    measured = [(_key(rule.level, r), r[rule.column]) for r in rows if r.get(rule.column) is not None]
    if not measured:
        return _not_measured(rule, report, "target")
    test = OPS[rule.op]
    failing = [(k, v) for k, v in measured if math.isnan(v) or not test(v, rule.limit)]
    key, value = min(measured, key=lambda kv: _badness(kv[1], rule))
    skipped = len(rows) - len(measured)
    message = f"{len(failing)} of {_rows(len(measured))} fail" if failing else f"all {_rows(len(measured))} pass"
    message += f" ({_rows(skipped)} null: not applicable)" if skipped else ""
    return Verdict(rule.text, rule.kind, rule.level, rule.column, not failing, value, rule.limit, _at(rule.level, key),
                   len(measured), len(failing), message, rule.source)


def _badness(value: float, rule: Rule) -> float:
    """Sort key: smallest = worst row for ``rule`` (NaN first, then the value nearest or furthest past the limit)."""
    if math.isnan(value):
        return -math.inf
    if rule.op in (">=", ">"):
        return value
    if rule.op in ("<=", "<"):
        return -value
    return -abs(value - rule.limit)


def _relative(rule: Rule, target: Report, baseline: Report) -> Verdict:
    base = {_key(rule.level, r): r.get(rule.column) for r in baseline.tables.get(rule.level) or []}
    rows = target.tables.get(rule.level) or []
    if all(r.get(rule.column) is None for r in rows):
        return _not_measured(rule, target, "target")
    if all(v is None for v in base.values()):
        return _not_measured(rule, baseline, "baseline")
    pairs, unmatched = [], 0
    for r in rows:
        k = _key(rule.level, r)
        if k not in base:
            unmatched += 1
        elif r.get(rule.column) is not None and base[k] is not None:
            pairs.append((k, _change(r[rule.column], base[k], rule.kind)))
    if not pairs:
        return _fail_unevaluated(rule, "no row has a value in both the target and the baseline")
    failing = [(k, c) for k, c in pairs if math.isnan(c) or c > rule.limit]
    key, change = max(pairs, key=lambda kc: math.inf if math.isnan(kc[1]) else kc[1])
    verb = "grew" if rule.kind == "growth" else "dropped"
    message = (f"{len(failing)} of {_rows(len(pairs))} {verb} more than {format_percent(rule.limit)}" if failing else
               f"all {_rows(len(pairs))} within {format_percent(rule.limit)}")
    notes = [f"{_rows(unmatched)} of the target without a baseline row"] if unmatched else []
    if len(pairs) + unmatched < len(rows):
        notes.append(f"{_rows(len(rows) - len(pairs) - unmatched)} null on one side")
    message += f" ({'; '.join(notes)})" if notes else ""
    return Verdict(rule.text, rule.kind, rule.level, rule.column, not failing, change, rule.limit, _at(rule.level, key),
                   len(pairs), len(failing), message, rule.source)


def _change(target: float, base: float, kind: str) -> float:
    """Relative change of ``target`` against ``base`` in the rule's direction (positive = grew for growth, dropped
    for drop). Comparing ``change <= f`` is ``target <= base + f|base|`` (growth); a zero baseline allows no growth
    (any growth is +inf), and a non-finite value on either side is NaN (fails)."""
    if not (math.isfinite(target) and math.isfinite(base)):
        return math.nan
    delta = (target - base) if kind == "growth" else (base - target)
    if base == 0:
        return 0.0 if delta == 0 else math.copysign(math.inf, delta)
    return delta / abs(base)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _pct(change: float) -> str:
    return "NaN (non-finite value)" if math.isnan(change) else f"{change * 100:.4g}%"


def _not_measured(rule: Rule, report: Report, role: str) -> Verdict:
    return _fail_unevaluated(rule, f"not measured: {rule.level}.{rule.column} is null in every row of the {role} "
                                   f"report ({_why_null(rule.column, report)})")


def _fail_unevaluated(rule: Rule, message: str) -> Verdict:
    return Verdict(rule.text, rule.kind, rule.level, rule.column, False, None, rule.limit, None, 0, 0, message,
                   rule.source)


def _why_null(column: str, report: Report) -> str:
    if column.startswith("grad_"):
        return "scan with --grad to measure it"
    if column in ("lip_layer_empirical", "tightness", "tightness_refined"):
        return "scan with --empirical-seqs 1 or more to measure it"
    if column in {c.name for c in ALL_TABLES["experts"]} and not report.tables.get("experts"):
        return "the model has no mixture-of-experts layers, so no experts table"
    if not report.calibrated:
        return "a weights-only report measures nothing that needs calibration text"
    return "this scan did not measure it for this model"


def _key(level: str, row: dict[str, Any]) -> Key:
    return tuple(row[k] for k in KEYS[level])


def _at(level: str, key: Key) -> dict[str, int]:
    return dict(zip(KEYS[level], key))


def _json_number(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def format_at(at: dict[str, int]) -> str:
    """``{"layer": 2, "head": 1}`` -> ``layer 2 head 1``; ``{"layer": 2, "expert": 5}`` -> ``layer 2 expert 5``;
    ``{}`` -> ``model``."""
    return " ".join(f"{n} {v}" for n, v in at.items()) or "model"


def describe(v: Verdict) -> str:
    """One self-contained line for annotations and JUnit: the rule, its worst observed value and where, the message."""
    if v.observed is None or v.kind == "finite":
        return f"{v.rule}: {v.message}"
    at = "" if v.at is None else f" at {format_at(v.at)}"
    return f"{v.rule}: observed {format_observed(v)}{at}; {v.message}"


def format_observed(v: Verdict) -> str:
    """The observed cell of every output: ``-`` when unevaluated, a percentage for relative rules, a count for
    ``finite``, else the worst value."""
    if v.observed is None:
        return "-"
    if v.kind == "growth":           # signed: +12% grew, -3% shrank
        return ("+" if v.observed > 0 else "") + _pct(v.observed)
    if v.kind == "drop":             # the amount dropped (negative: it rose)
        return _pct(v.observed)
    if v.kind == "finite":
        return f"{int(v.observed)} non-finite"
    return f"{v.observed:.6g}"


__all__ = ["Verdict", "check_finite", "evaluate_gate", "evaluate_rule", "describe", "format_at", "format_observed"]

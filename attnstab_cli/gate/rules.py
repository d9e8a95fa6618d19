"""Gate rules: parse ``[level.]column OP number`` (absolute) and ``[level.]column growth|drop <= N%`` (relative to a
baseline report) from ``--rule`` flags, and validate every column against the report schema before any scan runs.

A rule names a report column (``report/schema.py``, listed by ``attnstab show --columns``); the level (``heads``,
``layers``, ``model``, or ``experts`` for a mixture-of-experts model's experts table, one row per (layer, expert); also
spelt ``expert``) may be left out when the column lives in exactly one table. Relative limits are fractions of
the baseline value: ``growth <= 20%`` holds for a row when ``target <= baseline + 0.20 |baseline|``, ``drop <= 5%``
when ``target >= baseline - 0.05 |baseline|``.
"""
from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from attnstab_cli.errors import UsageError
from attnstab_cli.report.schema import ALL_TABLES

LEVELS = ("heads", "layers", "model", "experts")
KEYS: dict[str, tuple[str, ...]] = {"heads": ("layer", "head"), "layers": ("layer",), "model": (),
                                    "experts": ("layer", "expert")}
ALIASES = {"expert": "experts"}
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
RELATIVE = ("growth", "drop")
SYNTAX = "[heads.|layers.|model.|experts.]COLUMN OP NUMBER (OP one of >= <= > < ==) or COLUMN growth|drop <= N%"
COLUMNS_HINT = "list the columns with: attnstab show --columns (or attnstab show REPORT --columns)"

_RULE = re.compile(r"^\s*(?:(?P<level>[A-Za-z_]\w*)\.)?(?P<column>[A-Za-z_]\w*)"
                   r"(?:\s+(?P<kind>growth|drop))?\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>[^\s<>=]\S*)\s*$")


@dataclass(frozen=True)
class Rule:
    """One gate rule. ``kind`` is ``absolute`` (``column OP limit`` on every row) or ``growth``/``drop`` (relative
    change against the baseline row, at most ``limit`` as a fraction); ``source`` says where it was written."""

    level: str
    column: str
    op: str
    limit: float
    kind: str = "absolute"
    source: str = "--rule"

    @property
    def relative(self) -> bool:
        return self.kind in RELATIVE

    @property
    def text(self) -> str:
        """The canonical spelling, with the level made explicit (used as the rule's name in every output)."""
        if self.relative:
            return f"{self.level}.{self.column} {self.kind} <= {format_percent(self.limit)}"
        return f"{self.level}.{self.column} {self.op} {self.limit:g}"


def format_percent(fraction: float) -> str:
    """``0.2`` -> ``20%`` (``g`` format, so ``0.125`` -> ``12.5%``)."""
    return f"{fraction * 100:g}%"


def parse_rule(text: str, source: str = "--rule") -> Rule:
    """One rule from its text form; unknown columns, levels and operators are usage errors (exit 2)."""
    m = _RULE.match(text)
    if m is None:
        raise UsageError(f"bad rule syntax {text!r} (in {source})", hint=f"write {SYNTAX}, e.g. 'theta_p05 >= 0.2'")
    level = resolve_level(m["column"], m["level"], text)
    kind = m["kind"] or "absolute"
    if kind in RELATIVE:
        if m["op"] != "<=":
            raise UsageError(f"relative rule {text!r} (in {source}) must use <=: it bounds the {kind}",
                             hint=f"e.g. '{m['column']} {kind} <= 20%'")
        return Rule(level, m["column"], "<=", parse_fraction(m["value"], text, source), kind, source)
    if m["value"].endswith("%"):
        raise UsageError(f"a percentage in {text!r} (in {source}) needs 'growth' or 'drop' against a baseline",
                         hint=f"e.g. '{m['column']} growth <= {m['value']}'")
    return Rule(level, m["column"], m["op"], parse_number(m["value"], text, source), kind, source)


def relative_rule(column: str, level: str | None, kind: str, limit: object, source: str) -> Rule:
    """A relative rule from config fields (``column``, optional ``level``, ``max_growth``/``max_drop``)."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
        raise UsageError(f"max_{kind} for {column!r} (in {source}) must be a non-negative number, got {limit!r}",
                         hint="a fraction of the baseline value: max_growth = 0.20 allows 20% growth")
    return Rule(resolve_level(column, level, f"{column} {kind}"), column, "<=", float(limit), kind, source)


def parse_number(value: str, text: str, source: str) -> float:
    """A finite or infinite float limit (``1e4``, ``0.2``, ``inf``); NaN would make every comparison false."""
    try:
        x = float(value)
    except ValueError:
        raise UsageError(f"bad number {value!r} in rule {text!r} (in {source})", hint=f"write {SYNTAX}") from None
    if math.isnan(x):
        raise UsageError(f"NaN is not a limit (rule {text!r} in {source})")
    return x


def parse_fraction(value: str, text: str, source: str) -> float:
    """``20%`` -> 0.2; a bare number is already a fraction (``0.2``). Must be finite and non-negative."""
    pct = value.endswith("%")
    x = parse_number(value[:-1] if pct else value, text, source) / (100.0 if pct else 1.0)
    if not math.isfinite(x) or x < 0:
        raise UsageError(f"relative limit {value!r} in {text!r} (in {source}) must be a finite, non-negative "
                         "percentage or fraction")
    return x


def resolve_level(column: str, level: str | None, text: str) -> str:
    """The table ``column`` is read from: ``level`` when given (checked), else the only table holding it."""
    holders = [name for name in LEVELS if column in _columns(name)]
    if level is not None:
        level = ALIASES.get(level, level)
        if level not in LEVELS:
            raise UsageError(f"unknown level {level!r} in rule {text!r}", hint="levels: heads, layers, model, experts")
        if column not in _columns(level):
            where = f"it is in {_listed(holders)}" if holders else _suggest(column)
            raise UsageError(f"unknown column {column!r} in the {level} table (rule {text!r}); {where}",
                             hint=COLUMNS_HINT)
        holders = [level]
    if not holders:
        raise UsageError(f"unknown column {column!r} in rule {text!r}; {_suggest(column)}",
                         hint=COLUMNS_HINT)
    if len(holders) > 1:
        raise UsageError(f"column {column!r} is in the {_listed(holders)} tables: name one in rule {text!r}",
                         hint=f"e.g. '{holders[0]}.{column}'")
    if not _numeric(holders[0], column):
        raise UsageError(f"column {column!r} is not numeric: a rule cannot compare it (rule {text!r})")
    return holders[0]


def _listed(names: list[str]) -> str:
    """``[a]`` -> ``a``; ``[a, b, c]`` -> ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _columns(level: str) -> dict[str, pa.DataType]:
    return {c.name: c.type for c in ALL_TABLES[level]}


def _numeric(level: str, column: str) -> bool:
    t = _columns(level)[column]
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _suggest(column: str) -> str:
    names = sorted({c.name for level in LEVELS for c in ALL_TABLES[level]})
    close = difflib.get_close_matches(column, names, n=3)
    return f"did you mean {', '.join(close)}?" if close else "no report table has it"


__all__ = ["KEYS", "LEVELS", "OPS", "RELATIVE", "Rule", "format_percent", "parse_rule", "relative_rule",
           "resolve_level"]

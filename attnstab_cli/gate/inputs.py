"""What a gate compares: complete reports, scanned on the baseline's tokens when it kept them.

An incomplete report (a layer or head missing, or a manifest that does not say how many there are) is a scan that
did not complete: exit 3, never a pass. Relative rules compare two reports row by row, which means something only for
the same architecture and depth (another family, depth or head count is refused: nothing would be compared) and on
identical calibration tokens (manifest ``calibration.token_sha256``; different tokens are refused unless explicitly
allowed).
"""
from __future__ import annotations

from attnstab_cli.errors import InputError, ScanFailure, UsageError
from attnstab_cli.gate.rules import KEYS, Rule
from attnstab_cli.report.read import Report
from attnstab_cli.report.same_tokens import check_same_tokens


def check_rules_need(rules: list[Rule], has_baseline: bool) -> None:
    """At least one rule, and a baseline for every relative rule (usage errors, before any scan)."""
    if not rules:
        raise UsageError("no gate rules: give --rule, --config FILE, or an attnstab.toml / pyproject.toml gate table",
                         hint="e.g. attnstab gate REPORT --rule 'theta_p05 >= 0.2'")
    relative = [r.text for r in rules if r.relative]
    if relative and not has_baseline:
        raise UsageError(f"relative rule(s) {', '.join(repr(t) for t in relative)} need --baseline REPORT")


def check_complete(report: Report, role: str) -> None:
    """Every layer, every head, the model row and, for a mixture-of-experts model, every (layer, expert) row present,
    as the manifest's checkpoint says (exit 3 otherwise)."""
    ck = report.manifest.get("checkpoint") or {}
    n_layers, n_heads = ck.get("n_layers"), ck.get("n_heads")
    problems = [f"manifest.json gives no checkpoint.{k}, so completeness cannot be checked"
                for k, v in (("n_layers", n_layers), ("n_heads", n_heads)) if not isinstance(v, int)]
    if len(report.tables.get("model") or []) != 1:
        problems.append(f"the model table has {len(report.tables.get('model') or [])} rows, not 1")
    layers = [r["layer"] for r in report.layers]
    expected = set(range(n_layers)) if isinstance(n_layers, int) else set(layers)
    if not layers or len(layers) != len(expected) or set(layers) != expected:
        missing = sorted(expected - set(layers))
        problems.append(f"the layers table has {len(layers)} rows for {len(expected)} layers"
                        + (f" (missing layers {missing})" if missing else ""))
    heads = {(r["layer"], r["head"]) for r in report.heads}
    if isinstance(n_heads, int) and (len(heads) != len(report.heads) or
                                     heads != {(layer, h) for layer in expected for h in range(n_heads)}):
        problems.append(f"the heads table has {len(report.heads)} rows for {len(expected)} x {n_heads} heads")
    problems += _experts_missing(report, ck.get("moe"))
    if problems:
        raise ScanFailure(f"the {role} report is incomplete: {'; '.join(problems)}", path=report.path,
                          hint="an incomplete scan never passes a gate: rescan the checkpoint")


def _experts_missing(report: Report, moe: object) -> list[str]:
    """A mixture-of-experts report holds one experts row per (MoE layer, expert), as its manifest's ``moe`` says."""
    if not isinstance(moe, dict):
        return []
    expected = {(layer, e) for layer in moe.get("moe_layers") or [] for e in range(moe.get("n_experts") or 0)}
    rows = report.tables.get("experts")
    if rows is None:
        return ["the model has mixture-of-experts layers but the report has no experts table"]
    have = [(r["layer"], r["expert"]) for r in rows]
    if len(have) != len(set(have)) or set(have) != expected:
        return [f"the experts table has {len(have)} rows for {len(expected)} (layer, expert) pairs"]
    return []


def check_aligned(target: Report, baseline: Report, rules: list[Rule]) -> None:
    """Relative rules need a baseline whose rows pair with the target's: the same family, depth and head count, and
    a baseline row for every target row of each level a relative rule reads (exit 2 otherwise)."""
    levels = sorted({r.level for r in rules if r.relative})
    if not levels:
        return
    ct, cb = target.manifest.get("checkpoint") or {}, baseline.manifest.get("checkpoint") or {}
    for key in ("family", "n_layers", "n_heads"):
        if ct.get(key) != cb.get(key):
            raise InputError(f"{key} {cb.get(key)!r} in the baseline, {ct.get(key)!r} in the target: relative rules "
                             "cannot pair their rows", path=baseline.path or "baseline",
                             hint="compare with a baseline report of the same architecture and depth")
    for level in levels:
        have = {tuple(row[k] for k in KEYS[level]) for row in baseline.tables.get(level) or []}
        missing = [row for row in target.tables.get(level) or [] if tuple(row[k] for k in KEYS[level]) not in have]
        if missing:
            raise InputError(f"{len(missing)} {level} rows of the target have no baseline row: relative rules "
                             "cannot compare them", path=baseline.path or "baseline")


def check_calibration(target: Report, baseline: Report, rules: list[Rule], allow_different: bool) -> list[str]:
    """Refuse relative rules across different calibration tokens unless allowed; notes on what differs."""
    if not any(r.relative for r in rules):
        return ["no relative rule: the baseline is not used"]
    ct, cb = target.manifest.get("calibration"), baseline.manifest.get("calibration")
    if ct is None or cb is None:
        return [] if ct is cb else ["one report is weights-only: only weight metrics can be compared"]
    return check_same_tokens(target, baseline, allow_different, "the target and the baseline",
                             "relative rules would mix model and data changes")


__all__ = ["check_aligned", "check_calibration", "check_complete", "check_rules_need"]

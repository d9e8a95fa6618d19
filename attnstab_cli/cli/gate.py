"""``attnstab gate TARGET``: pass/fail rules on a report (or a checkpoint, scanned first) for CI.

Exit codes (STYLE.md, "CLI"): 0 every rule passed, 1 a rule failed, 2 usage or input error, 3 the scan could not
complete (an incomplete scan never passes). The rule logic lives in :mod:`attnstab_cli.gate`; this module parses,
calls it and renders.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from attnstab_cli.cli.options import Force, Json, Out, Quiet
from attnstab_cli.cli.output import handle_errors, print_json, require_one_process, stderr_console, stdout_console
from attnstab_cli.cli.scan_flags import ScanFlags, with_scan_flags
from attnstab_cli.cli.targets import resolve_target
from attnstab_cli.errors import AttnstabError, UsageError
from attnstab_cli.gate import (
    Verdict, check_aligned, check_calibration, check_complete, check_rules_need, collect_rules,
    evaluate_gate,
)
from attnstab_cli.gate.evaluate import describe, format_at, format_observed
from attnstab_cli.gate.github import (
    annotation, append_step_summary, build_annotations, build_error_summary, build_step_summary,
)
from attnstab_cli.gate.junit import build_junit
from attnstab_cli.report.read import Report, is_report_dir, load_report
from attnstab_cli.report.same_tokens import tokens_for
from attnstab_cli.report.destination import check_destination, check_file_destination
from attnstab_cli.report.write import write_file_atomic, write_report

GATE_EPILOG = (
    "Examples:  attnstab gate report/ --rule 'theta_p05 >= 0.2' --rule 'layers.lip_layer_calibrated <= 1e4'  |  "
    "attnstab gate ckpt/ --baseline accepted/ --rule 'sens_proxy_ln growth <= 20%' --github --junit-xml gate.xml"
)


@handle_errors
@with_scan_flags
def gate(
    target: Annotated[str, typer.Argument(
        help="A report directory (attnstab scan --out) or a checkpoint, which is scanned first.", show_default=False)],
    rule: Annotated[Optional[list[str]], typer.Option(
        "--rule", "-r", help="A rule, repeatable: '\\[heads.|layers.|model.|experts.]COLUMN OP NUMBER' (OP >= <= > < "
                             "==), or 'COLUMN growth|drop <= 20%' against --baseline.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML file with the rules: \\[gate] (attnstab.toml) or \\[tool.attnstab.gate] "
                         "(pyproject.toml). Default: the first of those two found in the current directory.")] = None,
    no_config: Annotated[bool, typer.Option(
        "--no-config", help="Do not look for attnstab.toml / pyproject.toml: only --rule flags.")] = False,
    baseline: Annotated[Optional[Path], typer.Option(
        "--baseline", help="Report directory the relative rules compare with; a checkpoint TARGET is scanned on its "
                           "calibration tokens.")] = None,
    allow_different_calibration: Annotated[bool, typer.Option(
        "--allow-different-calibration", help="Allow relative rules across reports scanned on different tokens.")]
    = False,
    junit_xml: Annotated[Optional[Path], typer.Option(
        "--junit-xml", help="Also write JUnit XML (one testcase per rule) to this path, atomically.")] = None,
    github: Annotated[bool, typer.Option(
        "--github", help="GitHub Actions: ::error annotations on stdout, and a Markdown step summary appended to "
                         "$GITHUB_STEP_SUMMARY.")] = False,
    out: Out = None, force: Force = False,
    json_out: Json = False, quiet: Quiet = False,
    *, flags: ScanFlags,
) -> None:
    """Check a report (or a checkpoint, scanned first) against rules: exit 0 pass, 1 a rule failed, 2 usage or input
    error, 3 the scan could not complete."""
    require_one_process("gate")
    if json_out and github:
        raise UsageError("--json and --github both write to stdout: choose one",
                         hint="--junit-xml PATH gives a machine-readable file alongside --github")
    if junit_xml is not None:           # replaced on every run, but only a JUnit file the gate wrote
        check_file_destination(junit_xml, "junit", force=True)
    try:
        rules, config_path = collect_rules(rule or [], config, Path.cwd(), discover=not no_config)
        check_rules_need(rules, baseline is not None)
        base = load_report(baseline) if baseline is not None else None
        if base is not None:
            check_complete(base, "baseline")
        report, notes = _load_target(target, base, out, force, quiet, flags)
        notes = ([f"rules from {config_path}"] if config_path is not None else []) + notes
        check_complete(report, "target")
        if base is not None:
            check_aligned(report, base, rules)
            notes += check_calibration(report, base, rules, allow_different_calibration)
        verdicts = evaluate_gate(rules, report, base)
    except Exception as exc:
        _report_could_not_run(exc, target, junit_xml, github)
        raise
    err = stderr_console()
    if not quiet:
        for note in notes:
            err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if json_out:
        print_json(_document(verdicts, target, baseline, config_path, report, base, notes))
    else:
        _render(verdicts)
    _write_ci_outputs(verdicts, target, baseline, notes, junit_xml, github, err)
    if not all(v.passed for v in verdicts):
        raise typer.Exit(1)


def _load_target(target: str, base: Report | None, out: Path | None, force: bool, quiet: bool,
                 flags: ScanFlags) -> tuple[Report, list[str]]:
    """A report directory as is; a checkpoint scanned (on the baseline's tokens unless calibration flags were given)
    and, with ``--out``, written. Returns the report and notes on how it was obtained."""
    if is_report_dir(Path(target)):
        if out is not None:
            raise UsageError("--out writes the scan of a checkpoint TARGET, and TARGET is already a report")
        return load_report(Path(target)), []
    if out is not None:
        check_destination(out, "report", force, [target] + ([base.path] if base is not None and base.path else []))
    explicit = any(getattr(flags, k) is not None for k in ("calib", "tokens", "seq_len"))
    calib, note = tokens_for(base, explicit, "the target", "the baseline")
    report, _ = resolve_target(target, flags.request(target), calib, quiet)
    notes = [note] if note else []
    if out is not None:
        write_report(out, report.tables, report.manifest, force=force, tokens=report.tokens)
        report.path = out
        notes.append(f"target report written to {out}")
    return report, notes


def _render(verdicts: list[Verdict]) -> None:
    """The rule table (worst row of each rule), then one line per failed rule saying why, then the verdict."""
    console = stdout_console()
    table = Table(box=box.SIMPLE_HEAD, title="attnstab gate", title_justify="left")
    for col in ("rule", "observed", "at", "failed / checked", "verdict"):
        table.add_column(col, justify="right" if col in ("observed", "failed / checked") else "left", overflow="fold")
    for v in verdicts:
        at = "-" if v.at is None else format_at(v.at)
        table.add_row(escape(v.rule), escape(format_observed(v)), at, f"{v.failed}/{v.checked}",
                      "[green]pass[/]" if v.passed else "[bold red]FAIL[/]")
    console.print(table)
    failed = [v for v in verdicts if not v.passed]
    for v in failed:
        console.print(f"[red]✗[/] {escape(describe(v))}", highlight=False)
    console.print(f"gate FAILED: {len(failed)} of {len(verdicts)} rules failed" if failed else
                  f"gate passed: {len(verdicts)} rules", highlight=False)


def _document(verdicts: list[Verdict], target: str, baseline: Path | None, config: Path | None, report: Report,
              base: Report | None, notes: list[str]) -> dict[str, Any]:
    def token_hash(r: Report | None) -> str | None:
        return None if r is None or not r.calibrated else r.manifest["calibration"]["token_sha256"]

    passed = all(v.passed for v in verdicts)
    return {"passed": passed, "exit_code": 0 if passed else 1, "target": target,
            "baseline": None if baseline is None else str(baseline), "config": None if config is None else str(config),
            "calibration": {"target": token_hash(report), "baseline": token_hash(base)}, "notes": notes,
            "rules": [v.to_json() for v in verdicts]}


def _write_ci_outputs(verdicts: list[Verdict], target: str, baseline: Path | None, notes: list[str],
                      junit_xml: Path | None, github: bool, err: Any) -> None:
    if github:
        for line in build_annotations(verdicts, target):
            sys.stdout.write(line + "\n")
        _append_summary(build_step_summary(verdicts, target, None if baseline is None else str(baseline), notes), err)
    if junit_xml is not None:
        _write_junit(junit_xml, build_junit(verdicts, {"target": target, "baseline": baseline and str(baseline)}))


def _report_could_not_run(exc: Exception, target: str, junit_xml: Path | None, github: bool) -> None:
    """The gate could not run (exit 2 or 3): still tell CI, as an erroring JUnit testcase and an ::error line."""
    message = exc.message if isinstance(exc, AttnstabError) else \
        f"the run could not complete: {type(exc).__name__}: {exc}"
    err = stderr_console()
    try:
        if github:
            sys.stdout.write(annotation("error", "attnstab gate could not run", message) + "\n")
            _append_summary(build_error_summary(message, target), err)
        if junit_xml is not None:
            _write_junit(junit_xml, build_junit([], {"target": target}, error=message))
    except AttnstabError as extra:      # the original error stays the one reported and its exit code
        err.print(f"note: {extra.message}", highlight=False, soft_wrap=True)


def _append_summary(markdown: str, err: Any) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        err.print("note: GITHUB_STEP_SUMMARY is not set: no step summary written", highlight=False)
        return
    try:
        append_step_summary(Path(path), markdown)
    except OSError as exc:
        raise UsageError(f"cannot append the step summary ({exc})", path=path) from None


def _write_junit(path: Path, xml: str) -> None:
    try:
        write_file_atomic(path, xml)
    except OSError as exc:
        raise UsageError(f"cannot write the JUnit XML ({exc})", path=path) from None

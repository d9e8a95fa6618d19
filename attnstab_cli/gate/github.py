"""GitHub Actions outputs: workflow-command annotations (``::error title=...::message``, one per failed rule) and
a Markdown step summary appended to the file named by ``$GITHUB_STEP_SUMMARY``.

Escaping follows the Actions toolkit (``@actions/core`` ``command.ts``): in the message ``%``, CR and LF become
``%25``, ``%0D``, ``%0A``; in a property (``title``) also ``:`` and ``,`` become ``%3A`` and ``%2C``.
"""
from __future__ import annotations

from pathlib import Path

from attnstab_cli.gate.evaluate import Verdict, describe, format_at, format_observed


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, title: str, message: str) -> str:
    """One workflow command line, e.g. ``::error title=attnstab gate%3A finite::2 non-finite values``."""
    return f"::{level} title={escape_property(title)}::{escape_data(message)}"


def build_annotations(verdicts: list[Verdict], target: str) -> list[str]:
    """An ``::error`` per failed rule; a single ``::notice`` when every rule passed."""
    failed = [v for v in verdicts if not v.passed]
    if not failed:
        return [annotation("notice", "attnstab gate passed", f"{len(verdicts)} rules passed on {target}")]
    return [annotation("error", f"attnstab gate: {v.rule}", f"{describe(v)} (target {target})") for v in failed]


def build_step_summary(verdicts: list[Verdict], target: str, baseline: str | None, notes: list[str]) -> str:
    """A Markdown section: verdict headline, the rule table, notes."""
    failed = sum(not v.passed for v in verdicts)
    head = f"failed: {failed} of {len(verdicts)} rules" if failed else f"passed: {len(verdicts)} rules"
    lines = [f"### attnstab gate {'❌' if failed else '✅'} {head}", "",
             f"Target: `{_code(target)}`" + (f" · baseline: `{_code(baseline)}`" if baseline else ""), "",
             "| rule | observed | at | verdict | detail |", "| --- | ---: | --- | --- | --- |"]
    for v in verdicts:
        at = "-" if v.at is None else format_at(v.at)
        lines.append(f"| `{_code(v.rule)}` | {_cell(format_observed(v))} | {at} | "
                     f"{'pass' if v.passed else '**FAIL**'} | {_cell(v.message)} |")
    lines += [""] + [f"- {_cell(n)}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def build_error_summary(message: str, target: str) -> str:
    """The step summary of a gate that could not run (exit 2 or 3)."""
    return f"### attnstab gate ❌ could not run\n\nTarget: `{_code(target)}`\n\n{_cell(message)}\n\n"


def append_step_summary(path: Path, markdown: str) -> None:
    """Append to the step summary file (Actions concatenates every step's appends)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(markdown)


def _code(text: str) -> str:
    """Inside a code span only a pipe needs escaping (GFM tables); ``<`` shows as written."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _cell(text: str) -> str:
    """Table-cell safe: no pipes, no newlines, no raw ``<`` (GitHub would read a tag)."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


__all__ = ["annotation", "append_step_summary", "build_annotations", "build_error_summary", "build_step_summary"]

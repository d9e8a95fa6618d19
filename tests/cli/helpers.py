"""Helpers for driving the CLI through Typer's test runner."""
from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from attnstab_cli.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    """Run ``attnstab ARGS`` in-process; stdout and stderr are captured separately."""
    return runner.invoke(app, [str(a) for a in args])


def assert_input_error(result, *needles: str) -> None:
    """Exit 2, exactly one ``Error:`` line naming the problem, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert all(ln.startswith(("Error:", "  hint:")) for ln in lines), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def copy_checkpoint(src: Path, tmp_path: Path) -> Path:
    """A copy of checkpoint ``src`` under ``tmp_path`` to break without touching the shared one."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst

"""SIGINT and SIGTERM: every command exits 130 with one line and no traceback, even while torch imports; the line
says what is complete on disk; finished track scans stay cached; no half file appears under a final name.

Each test runs the real entry point in a subprocess through ``pause_point.py``, which pauses at a named point and
says so on stderr; the signal is sent once that line is read, so it lands exactly there (no sleeps, no races).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from attnstab_cli.report.read import load_report

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints"
PAUSE = Path(__file__).with_name("pause_point.py")
FAST = ("--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "1", "--empirical-seqs", "0")


def run_until_paused(point: str, *args: str | Path, sig: int = signal.SIGINT) -> tuple[int, list[str]]:
    """Run ``attnstab ARGS`` pausing at ``point``, send ``sig`` there; return the exit code and the stderr lines
    written after the pause."""
    proc = subprocess.Popen([sys.executable, str(PAUSE), point, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    before = []
    for line in proc.stderr:
        before.append(line)
        if line.startswith("paused at"):
            break
    else:
        proc.wait(timeout=60)
        pytest.fail(f"never reached {point!r} (exit {proc.returncode}): {''.join(before)}")
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, [ln for ln in rest.splitlines() if ln.strip()]


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_scan_exits_130_and_leaves_nothing(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "report"
    code, lines = run_until_paused("progress:gpt2-tiny", "scan", SAMPLES / "gpt2-tiny", *FAST, "--out", out, sig=sig)
    assert (code, lines) == (130, ["Interrupted; nothing was written."])
    assert list(tmp_path.iterdir()) == []                      # no report, no staging directory


def test_a_signal_while_torch_imports_exits_130_without_traceback(tmp_path: Path) -> None:
    code, lines = run_until_paused("import-torch", "scan", SAMPLES / "gpt2-tiny", *FAST, "--out", tmp_path / "r")
    assert (code, lines) == (130, ["Interrupted; nothing was written."])
    assert list(tmp_path.iterdir()) == []


def test_a_signal_after_the_report_is_published_says_it_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, lines = run_until_paused("render", "scan", SAMPLES / "gpt2-tiny", *FAST, "--out", out)
    assert (code, lines) == (130, [f"Interrupted; complete on disk: {out}."])
    assert load_report(out).manifest["checkpoint"]["fingerprint"]            # the whole report, readable
    assert hidden(tmp_path) == []


def test_a_signal_during_track_keeps_the_finished_scans(tmp_path: Path) -> None:
    out = tmp_path / "track"
    code, lines = run_until_paused("progress:gpt2-tiny-step800", "track", SAMPLES / "gpt2-tiny-step200",
                                   SAMPLES / "gpt2-tiny-step800", *FAST, "--out", out)
    cached = list((out / "cache").iterdir())
    assert code == 130 and lines == [f"Interrupted; complete on disk: {cached[0]}."]
    assert len(cached) == 1 and "gpt2-tiny-step200" in load_report(cached[0]).manifest["checkpoint"]["checkpoint"]
    assert sorted(p.name for p in out.iterdir()) == ["cache"] and hidden(out) == []   # no track.json, no temp files


def test_the_entry_point_handles_signals_before_importing_anything_heavy() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["attnstab"] == "attnstab_cli.cli.entry:main"
    probe = ("import sys, attnstab_cli.cli.entry; "
             "print(sorted(m for m in ('torch', 'numpy', 'typer', 'rich', 'click') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"

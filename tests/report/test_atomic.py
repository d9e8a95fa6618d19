"""Atomic reports (issue 5, item 1): a scan killed mid-run, or failing while its files are written, leaves no report
and no half-written directory under the report's name."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from attnstab_cli.report import write
from cli.helpers import invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"
PAUSE = Path(__file__).resolve().parents[1] / "cli" / "pause_point.py"


def test_failure_while_writing_the_second_table_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    real, calls = write.pq.write_table, []

    def fail_second(table, where, *a, **k):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(table, where, *a, **k)

    monkeypatch.setattr(write.pq, "write_table", fail_second)
    out = tmp_path / "report"
    result = invoke("scan", SAMPLES / "gpt2-tiny", "--seq-len", "8", "--batches", "1", "--batch-size", "1",
                    "--empirical-seqs", "0", "--out", out, "--quiet")
    assert result.exit_code == 3 and "disk full" in result.stderr
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_killed_scan_leaves_no_report(tmp_path: Path) -> None:
    """SIGKILL (no cleanup runs) while the report's files are being written: the report name never appears, only
    the hidden staging directory. ``pause_point.py`` stops the scan after its first table file and says so."""
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, str(PAUSE), "write-table", "scan", str(SAMPLES / "gpt2-tiny"), "--out",
                             str(out), "--calib", "random", "--seq-len", "16", "--batches", "1", "--batch-size", "1",
                             "--empirical-seqs", "0", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr.readline() == "paused at write-table\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (staging,) = tmp_path.iterdir()
    assert staging.name.startswith(".report.") and staging.name.endswith(".partial")
    assert not (staging / "manifest.json").exists() and not out.exists()

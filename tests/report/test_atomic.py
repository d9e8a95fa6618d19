"""Atomic reports (issue 5, item 1): a scan killed mid-run, or failing while its files are written, leaves no report
and no half-written directory under the report's name."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from attnstab_cli.report import write
from cli.helpers import invoke

SAMPLES = Path(__file__).resolve().parents[2] / "sample_checkpoints"


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
    """SIGKILL (no cleanup runs) during the scan: the report name never appears."""
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "attnstab_cli", "scan", str(SAMPLES / "gpt2-tiny"), "--out",
                             str(out), "--empirical-seqs", "2", "--grad"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(4.0)                                      # imports, open, fingerprint, first layers of the scan
    assert proc.poll() is None, "the scan finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not any(p.name == "report" for p in tmp_path.iterdir())

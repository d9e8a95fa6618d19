"""Progress on stderr (one line per stage step when stderr is not a terminal) and its silence under --quiet."""
from __future__ import annotations

from pathlib import Path

from cli.helpers import invoke


def test_progress_lines_per_stage_and_quiet(tiny_checkpoints: dict, tmp_path: Path) -> None:
    path, _ = tiny_checkpoints["gpt2"]
    args = ("scan", path, "--calib", "random", "--seq-len", "16", "--batch-size", "1", "--batches", "2",
            "--empirical-seqs", "0", "--grad")
    loud = invoke(*args, "--out", tmp_path / "a")
    assert loud.exit_code == 0, loud.stderr
    lines = loud.stderr.splitlines()
    assert f"{path.name} scan: layers 2/2" in lines                 # the layer stream's last step, always shown
    assert f"{path.name} grad: backward 2/2" in lines               # the --grad backward stream
    quiet = invoke(*args, "--out", tmp_path / "b", "--quiet")
    assert quiet.exit_code == 0 and "scan: layers" not in quiet.stderr and "grad:" not in quiet.stderr

"""Pieces of ``scan_cost.py --distributed``: the torchrun command, per-rank peak RSS, the check that a sharded
report equals the one-process report, the table and the README block.

Why a separate module: the figure needs a process-tree memory sampler and a report comparison that no other figure
of ``scan_cost.py`` uses. The comparison is the bench's cheap sanity check, not the test of the merge
(``tests/distributed/test_distributed_scan.py`` is): counts, extrema and histogram percentiles merge exactly
(THEORY §3.8), so those columns must be bit-identical at every world size; the other columns are listed when they
differ, with their largest relative difference (sums and means merge up to float64 reassociation).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

README_BEGIN = "<!-- scan_cost_distributed -->"
README_END = "<!-- /scan_cost_distributed -->"
# Column names of counts, extrema and histogram percentiles (with their brackets): merged exactly.
EXACT_COLUMN = re.compile(r"^n_|_max$|_min$|_min_|_p\d\d(_lo|_hi)?$")


def torchrun_prefix(world_size: int) -> list[str]:
    """The launch of ``world_size`` local ranks of ``python -m attnstab_cli`` by torchrun (one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
            "-m", "attnstab_cli"]


def descendants(root: int) -> list[int]:
    """Every live descendant of process ``root``, from /proc. torchrun starts each worker in a session of its own,
    so the launcher's process group or session does not hold the ranks."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])    # fields after the name: state ppid ...
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class RankPeaks:
    """Peak RSS (``VmHWM``) of a launcher and every descendant, read from /proc every ``every_s``.

    Each process is labelled by the ``RANK`` its launcher gave it (``rank_0``, ...), else ``launcher`` (torchrun's
    agent) or ``process`` (a one-process scan). A value is the last one read before the process exited, so it can
    miss growth in the last ``every_s``; the exact peak of the largest process is ``os.wait4``'s.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.peaks: dict[int, tuple[str, float]] = {}        # pid -> (label, MB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, root: int) -> None:
        self._thread = threading.Thread(target=self._poll, args=(root,), daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Label -> peak MB, largest first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return dict(sorted(((label, round(mb, 1)) for label, mb in self.peaks.values()), key=lambda kv: -kv[1]))

    def _poll(self, root: int) -> None:
        while not self._stop.is_set():
            for pid in [root, *descendants(root)]:
                peak, label = _vm_hwm_mb(pid), _label(pid)
                if peak is None:
                    continue
                prev = self.peaks.get(pid)
                # A new label means the process has exec'd since its fork: the peak read before was its parent's.
                self.peaks[pid] = (label, peak if prev is None or prev[0] != label else max(peak, prev[1]))
            self._stop.wait(self.every_s)


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _label(pid: int) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "process"
    rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)
    if rank is not None:
        return f"rank_{rank}"
    return "launcher" if b"torch.distributed.run" in cmdline else "process"


def compare_reports(one: Path, many: Path) -> dict:
    """``many``'s tables against ``one``'s: the exact columns (non-float, or named as a count, extremum or
    percentile) that are not bit-identical, and every other column that differs with its largest relative
    difference."""
    import numpy as np
    import pandas as pd

    names = sorted(p.name for p in one.glob("*.parquet"))
    if names != sorted(p.name for p in many.glob("*.parquet")):
        return {"pass": False, "error": "the reports have different tables"}
    exact_bad, differ, n_exact = [], {}, 0
    for name in names:
        a, b = pd.read_parquet(one / name), pd.read_parquet(many / name)
        if list(a.columns) != list(b.columns) or len(a) != len(b):
            return {"pass": False, "error": f"{name}: different columns or row counts"}
        for col in a.columns:
            x, y = a[col].to_numpy(), b[col].to_numpy()
            key = f"{name.removesuffix('.parquet')}.{col}"
            if x.dtype.kind != "f" or EXACT_COLUMN.search(col):
                n_exact += 1
                same = np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else all(
                    p == q or (pd.isna(p) and pd.isna(q)) for p, q in zip(x, y))
                if not same:
                    exact_bad.append(key)
            elif not np.array_equal(x, y, equal_nan=True):
                scale = np.maximum(np.abs(x), np.abs(y))
                rel = np.abs(x - y) / np.where(scale > 0, scale, 1.0)
                differ[key] = float(np.nanmax(rel))
    return {"pass": not exact_bad, "exact_columns": n_exact, "exact_not_identical": exact_bad,
            "other_columns_differing": {k: float(f"{v:.3g}") for k, v in sorted(differ.items())}}


def _fmt(v: float | None, nd: int) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def markdown(records: list[dict]) -> str:
    """One row per launch: wall time, speedup and efficiency against the one-process scan, memory, stages."""
    lines = [("| device | world size | launcher | threads per rank | wall s | speedup | efficiency | peak MB largest "
              "| peak MB all ranks | ranks_wait s | merge s | exact columns = W1 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        m = r["measured"]
        t = m.get("timings") or {}
        status = "" if m["rc"] == 0 and not m["timed_out"] else " (timeout)" if m["timed_out"] else \
            f" (error rc={m['rc']})"
        match = r["report_check"]
        verdict = "—" if match is None else "yes" if match["pass"] else "NO"
        lines.append(f"| {r['device']} | {r['world_size']} | {r['launcher']} | {r['threads_per_rank']} | "
                     f"{_fmt(m['wall_s'], 1)}{status} | {_fmt(r['speedup'], 2)} | {_fmt(r['efficiency'], 2)} | "
                     f"{_fmt(m['peak_rss_mb'], 0)} | {_fmt(r['peak_rss_mb_ranks_sum'], 0)} | "
                     f"{_fmt(t.get('ranks_wait_s'), 2)} | {_fmt(t.get('merge_s'), 2)} | {verdict} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, heading: str, table: str) -> bool:
    """Replace the text between the README's distributed-figure markers by ``heading`` and ``table``; False
    (README untouched) when the markers are missing."""
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    block = f"{README_BEGIN}\n{heading}\n\n{table}{README_END}"
    tmp = readme.with_name(f".{readme.name}.partial")
    tmp.write_text(text[:start] + block + text[end + len(README_END):])
    os.replace(tmp, readme)
    return True

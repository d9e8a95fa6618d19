"""Run ``python -m attnstab_cli``, pausing at one named point until a signal arrives (for the interrupt tests).

Usage: ``python pause_point.py POINT ATTNSTAB-ARGS...``. At POINT it writes ``paused at POINT`` on stderr and sleeps;
the test sends its signal once it reads that line, so the signal lands exactly there with no timing involved.

POINT is one of:

* ``import-torch``: while torch is being imported (the entry point's first seconds);
* ``progress:LABEL``: at the first ``scan`` progress step of checkpoint LABEL (its directory name);
* ``render``: after ``scan`` published its report, before the summary is rendered;
* ``write-table``: inside the report's staging directory, after its first table file.
"""
from __future__ import annotations

import importlib.abc
import runpy
import sys
import time

PAUSE_S = 300                  # the test's own timeout ends a run whose signal never came


def pause(point: str) -> None:
    sys.stderr.write(f"paused at {point}\n")
    sys.stderr.flush()
    time.sleep(PAUSE_S)


class PauseOnImport(importlib.abc.MetaPathFinder):
    """Pauses the first time ``name`` is looked up, then lets the normal finders import it."""

    def __init__(self, name: str) -> None:
        self.name, self.done = name, False

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name and not self.done:
            self.done = True
            pause(f"import-{fullname}")


def install(point: str) -> None:
    if point == "import-torch":
        sys.meta_path.insert(0, PauseOnImport("torch"))
        return
    if point.startswith("progress:"):
        from attnstab_cli.cli.targets import ProgressReport

        label, real = point.split(":", 1)[1], ProgressReport.__call__

        def paused_call(self, stage, done, total):
            real(self, stage, done, total)
            if self.label == label and stage.startswith("scan"):
                ProgressReport.__call__ = real
                pause(point)

        ProgressReport.__call__ = paused_call
    elif point == "render":
        import attnstab_cli.cli.scan as scan_cli

        real_render = scan_cli.render_report

        def paused_render(*args, **kwargs):
            pause(point)
            return real_render(*args, **kwargs)

        scan_cli.render_report = paused_render
    elif point == "write-table":
        import attnstab_cli.report.write as write

        real_write = write.pq.write_table

        def paused_write(*args, **kwargs):
            real_write(*args, **kwargs)
            write.pq.write_table = real_write
            pause(point)

        write.pq.write_table = paused_write
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["attnstab", *sys.argv[2:]]
    runpy.run_module("attnstab_cli", run_name="__main__", alter_sys=True)      # as python -m attnstab_cli

"""The console entry point (``attnstab``, ``python -m attnstab_cli``).

It imports only the standard library until SIGINT and SIGTERM are handled, so an interrupt at any moment, even while
torch imports (several seconds), ends with one line on stderr and exit 130, never a traceback. What is complete on
disk at that moment (:func:`attnstab_cli.report.destination.published`) is named in that line.
"""
from __future__ import annotations

import sys

from attnstab_cli.cli.interrupts import INTERRUPT_EXIT, INTERRUPTS, Interrupted, handle_interrupts, \
    interrupt_received, interrupted_line


def main() -> None:
    """Run the ``attnstab`` app with interrupts handled before its imports."""
    handle_interrupts()
    try:
        from attnstab_cli.cli.app import app

        if interrupt_received():            # an extension's import swallowed the interrupt
            raise Interrupted("during imports")
        app()
    except BaseException as exc:
        if isinstance(exc, SystemExit) or not (isinstance(exc, INTERRUPTS) or interrupt_received()):
            raise
        sys.stderr.write(interrupted_line() + "\n")
        sys.exit(INTERRUPT_EXIT)

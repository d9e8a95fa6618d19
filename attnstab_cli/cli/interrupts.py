"""SIGINT and SIGTERM as one exception, and the line an interrupt leaves (standard library only).

The entry point installs the handlers before anything heavy is imported; the commands' error handling turns the
exception into exit 130 and one line naming what is complete on disk
(:func:`attnstab_cli.report.destination.published`).
"""
from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

INTERRUPT_EXIT = 130


class Interrupted(BaseException):
    """Raised by the SIGINT/SIGTERM handler. Not a KeyboardInterrupt, which click turns into "Aborted!" and exit 1
    when it arrives while the command line is parsed; not an Exception, so no ``except Exception`` swallows it."""


INTERRUPTS = (KeyboardInterrupt, Interrupted)
_received: list[int] = []


def interrupt_received() -> bool:
    """Whether SIGINT or SIGTERM arrived. An interrupt inside an extension's import or C code can surface as another
    exception (numpy raises ImportError "cannot load module more than once"); after a signal, any failure is the
    interrupt."""
    return bool(_received)


def handle_interrupts() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted`. A second one is ignored, so removing the staging directories
    and printing the line are not cut short; a third ends the process at once (only hidden temporary names can be
    left, as after a kill). A signal the parent set to be ignored (a background job) stays ignored."""
    owned = [sig for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]

    def set_all(handler: Any) -> None:
        for sig in owned:
            signal.signal(sig, handler)

    def interrupt(signum: int, frame: object) -> None:
        _received.append(signum)
        set_all(ignore_once)
        raise Interrupted(signal.Signals(signum).name)

    def ignore_once(signum: int, frame: object) -> None:
        set_all(signal.SIG_DFL)

    set_all(interrupt)


def interrupted_line() -> str:
    """What an interrupt leaves: the outputs published before it (complete), or that nothing was written."""
    from attnstab_cli.report.destination import published

    done = [str(p) for p in dict.fromkeys(published())]
    if not done:
        return "Interrupted; nothing was written."
    listed = ", ".join(done[:3]) + (f" and {len(done) - 3} more" if len(done) > 3 else "")
    return f"Interrupted; complete on disk: {listed}."

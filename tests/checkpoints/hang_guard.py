"""A per-call deadline for in-process CLI runs, so an input that blocks (a FIFO, a device) fails a test instead of
hanging the suite."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Hang(Exception):
    """Raised by the SIGALRM handler when a guarded call outlives its deadline."""


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise :class:`Hang` inside the block once ``seconds`` have passed (the CLI turns it into exit 3, which every
    caller here treats as a failure)."""
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

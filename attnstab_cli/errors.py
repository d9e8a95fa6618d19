"""Errors the CLI turns into one clear line and an exit code (STYLE.md, CLI section).

Every user-facing failure is an :class:`AttnstabError`; ``main()`` prints ``Error: <message>`` (plus an optional hint)
and exits with the error's code. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class AttnstabError(Exception):
    """Base class: a message for the user, an optional hint, and the process exit code."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None) -> None:
        self.detail, self.hint, self.path = message, hint, path
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The one line shown to the user: ``<file>: <problem>`` when a file is known."""
        return f"{self.path}: {self.detail}" if self.path is not None else self.detail

    def __str__(self) -> str:
        return self.message

    def at(self, path: str | Path) -> "AttnstabError":
        """Attach the file this error is about, unless a more precise one is already known."""
        if self.path is None:
            self.path = path
        return self


class InputError(AttnstabError):
    """Bad input: unreadable or malformed checkpoint, config, calibration or token file (exit 2)."""

    exit_code = 2


class UsageError(AttnstabError):
    """Options that contradict each other or ask for something impossible (exit 2)."""

    exit_code = 2


class UnsupportedError(InputError):
    """A checkpoint feature attnstab does not handle yet (unknown family, rope type, activation) (exit 2)."""


class ScanFailure(AttnstabError):
    """The work could not complete at run time (exit 3); an incomplete scan never passes a gate."""

    exit_code = 3

"""Consoles and error reporting: data on stdout, progress, logs and errors on stderr (STYLE.md, "CLI")."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from attnstab_cli.cli.interrupts import INTERRUPT_EXIT, INTERRUPTS, Interrupted, interrupt_received, interrupted_line
from attnstab_cli.distributed.group import read_launch_env
from attnstab_cli.errors import AttnstabError, UsageError
from attnstab_cli.report.destination import forget_published

F = TypeVar("F", bound=Callable[..., Any])
STATE = {"debug": os.environ.get("ATTNSTAB_DEBUG") == "1",
         "silent": False}   # a rank other than 0: its failure is rank 0's to print (it exits with its code)


def stdout_console() -> Console:
    """A console on the current stdout (created per call so test runners can capture it)."""
    return Console(file=sys.stdout, width=max(100, Console(file=sys.stdout).width))


def stderr_console() -> Console:
    return Console(file=sys.stderr)


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def handle_errors(fn: F) -> F:
    """Turn :class:`AttnstabError` into ``Error: ...`` (and a hint) on stderr plus its exit code; any other exception
    means the work could not complete: one line and exit 3 (never 1, which a gate reserves for a failed rule).

    With ``--debug`` or ``ATTNSTAB_DEBUG=1`` the exception propagates with its traceback instead. A rank other than 0
    of a multi-process run (:func:`silence_errors`) prints nothing and exits with the same code: rank 0 names it.
    An interrupt (Ctrl-C, SIGTERM) is one line saying what is complete on disk, and exit 130, whatever the flags.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        forget_published()
        try:
            if interrupt_received():        # arrived while the command line was parsed
                raise Interrupted("before the command")
            return fn(*args, **kwargs)
        except AttnstabError as exc:
            if interrupt_received():
                _exit_interrupted()
            if STATE["debug"]:
                raise
            if STATE["silent"]:
                raise typer.Exit(exc.exit_code) from None
            err = stderr_console()
            err.print(f"[bold red]Error:[/] {escape(exc.message)}", markup=True, highlight=False, soft_wrap=True)
            if exc.hint:
                err.print(f"  hint: {exc.hint}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except INTERRUPTS:
            _exit_interrupted()
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:            # a failure we did not anticipate: the work did not complete (exit 3)
            if interrupt_received():
                _exit_interrupted()
            if STATE["debug"]:
                raise
            if STATE["silent"]:
                raise typer.Exit(3) from None
            stderr_console().print(f"[bold red]Error:[/] the run could not complete: {type(exc).__name__}: "
                                   f"{escape(str(exc))}",
                                   markup=True, highlight=False, soft_wrap=True)
            stderr_console().print("  hint: rerun with --debug for the traceback, and please report it",
                                   highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


def silence_errors(silent: bool) -> None:
    """Whether this process's errors are left to another process (rank 0) to print."""
    STATE["silent"] = silent


def require_one_process(command: str) -> None:
    """A command that is not distributed refuses a multi-rank launch rather than running once per rank (the
    refusal is rank 0's to print)."""
    env = read_launch_env()
    if env is not None:
        silence_errors(env.rank != 0)
        raise UsageError(f"{command} runs in one process: of the commands only scan and track are distributed "
                         f"across ranks", hint=f"start attnstab {command} without torchrun")


def _exit_interrupted() -> None:
    """One line saying what the interrupt left on disk, then exit 130 (whatever the exception it turned into)."""
    stderr_console().print(interrupted_line(), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(INTERRUPT_EXIT) from None

"""The ``attnstab`` command: a thin Typer app over the library (STYLE.md, "CLI")."""
from __future__ import annotations

from typing import Annotated

import typer

from attnstab_cli import __version__
from attnstab_cli.cli.compare import compare
from attnstab_cli.cli.gate import GATE_EPILOG, gate
from attnstab_cli.cli.info import info
from attnstab_cli.cli.output import STATE
from attnstab_cli.cli.plot import plot
from attnstab_cli.cli.scan import scan
from attnstab_cli.cli.show import show
from attnstab_cli.cli.track import track

EPILOG = (
    "Examples:  attnstab info sample_checkpoints/gpt2-tiny  |  "
    "attnstab scan sample_checkpoints/gpt2-tiny --out report/  |  "
    "attnstab scan model.safetensors --arch llama --n-heads 32 --norm-eps 1e-5 --rope-theta 10000 --calib random"
)

app = typer.Typer(
    name="attnstab", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    help="Numerical and architectural health scans for transformer checkpoints.", epilog=EPILOG,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnstab {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show full tracebacks for errors (or ATTNSTAB_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """attnstab: numerical and architectural health scans for transformer checkpoints."""
    STATE["debug"] = STATE["debug"] or debug


app.command(epilog=EPILOG)(info)
app.command(epilog=EPILOG)(scan)
app.command(epilog=EPILOG)(compare)
app.command(epilog=EPILOG)(show)
app.command(epilog=EPILOG)(track)
app.command(epilog=GATE_EPILOG)(gate)
app.command(epilog=EPILOG)(plot)

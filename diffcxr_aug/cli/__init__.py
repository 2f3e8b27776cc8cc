"""The ``diffcxr-aug`` command line: a thin typer layer over plain functions that tests call in-process.

Each command validates its arguments, then hands over to the library. Bad input (a missing file, a
malformed manifest or recipe, an option out of range: :class:`diffcxr_aug.errors.InputError` and pydantic's
validation of the options) ends with exit code 2 and a one-line reason on stderr; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer

from diffcxr_aug import __version__
from diffcxr_aug.cli import classifier_commands, data_commands, generator_commands, run_command
from diffcxr_aug.cli.options import app

# The command modules register their commands on ``app`` when imported.
COMMAND_MODULES = (data_commands, generator_commands, classifier_commands, run_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffcxr-aug {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    from diffcxr_aug.runtime import setup_logging

    setup_logging(verbose)


__all__ = ["app"]

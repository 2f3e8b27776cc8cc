"""The whole loop from one recipe: ``run RECIPE.yaml [--set key=value ...]``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from diffcxr_aug.cli.options import (
    app,
    call,
    fail,
)
from diffcxr_aug.config import load_recipe


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe", dir_okay=False)],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a recipe key, e.g. --set classifier.epochs=3")
    ] = None,
) -> None:
    """Run the whole loop from one recipe, then write OUTPUT_DIR/report.md (its path is the last line printed).

    A rerun skips the steps that finished with the same settings and finishes the one that was interrupted.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would run every step and write the same files; the steps that scale run as their commands.
        fail(
            "run drives one process and cannot run under torchrun / accelerate launch; run it in one process, and "
            "launch train-generator and synthesize with --recipe on several GPUs (README: Real data on GPUs)"
        )
    rec = call(load_recipe, recipe, set_ or [])
    from diffcxr_aug.augment.experiment import run_experiment

    path = call(run_experiment, rec, echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"report: {path}")

"""What every command of the command line shares: the typer app, the common options, and the translation of a
recipe section plus the options given into settings. Bad input ends in a one-line error and exit code 2."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import ValidationError

from diffcxr_aug.config import load_recipe
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.settings import GeneratorSettings, VAESettings
from diffcxr_aug.types import (
    DEVICES,
    ClassifierMode,
    FilterNormalize,
    Settings,
    ThresholdRule,
)

app = typer.Typer(
    name="diffcxr-aug",
    help="Diff-CXR report-to-X-ray generation and synthetic-data augmentation for chest X-ray classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("diffcxr_aug")

# ``--mode`` picks how synthetic images join the real ones; without --synthetic every run is "real".
SYNTHETIC_MODES: tuple[str, ...] = tuple(m for m in get_args(ClassifierMode) if m != "real")
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
FILTER_NORMALIZE: tuple[str, ...] = get_args(FilterNormalize)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def field_help(section: type[Settings], name: str, text: str | None = None) -> str:
    """An option's help from its recipe field: ``text`` (default: the field's description) and the allowed range."""
    field = section.model_fields[name]
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = [f"{symbols[key]} {getattr(m, key)}" for m in field.metadata for key in symbols if hasattr(m, key)]
    return " ".join(part for part in (text or field.description, f"[{', '.join(bounds)}]" if bounds else "") if part)


def check_choice(value: str | None, choices: tuple[str, ...], flag: str) -> None:
    if value is not None and value not in choices:
        fail(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")


def check_device(value: str | None) -> str | None:
    """``--device``: checked (spelling, and that a CUDA device exists) before any work starts."""
    if value is not None:
        from diffcxr_aug.runtime import resolve_device

        try:
            resolve_device(value)
        except InputError as err:
            fail(str(err))
    return value


DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", callback=check_device, help=f"{' | '.join(DEVICES)} (default: the recipe's device)"),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed (reproduces the run; default: the recipe's)")]
RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", help="YAML recipe whose section supplies the defaults", dir_okay=False)
]


def call(fn, *args: Any, **kwargs: Any) -> Any:
    """Run a library entry point; bad input (an :class:`InputError`) ends in a one-line error and exit code 2.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        fail(f"not implemented yet: {err}")
    except KeyboardInterrupt:
        # Long jobs checkpoint as they go; the same command picks up where this one stopped.
        fail("interrupted; rerun the same command to continue where it stopped", code=130)
    except InputError as err:
        fail(str(err))


def merge(section: Settings, flags: dict[str, str] | None = None, **updates: Any) -> Settings:
    """Command-line options (those given) over the recipe section, validated together.

    ``flags`` names the option of a field whose flag is not ``--field-name`` (for the error message).
    """
    given = {k: v for k, v in updates.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        flags = flags or {}
        problems = []
        for item in err.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            flag = flags.get(name, f"--{name.replace('_', '-')}") if name else "options"
            shown = f" {item['input']!r}" if name in given else ""
            problems.append(f"{flag}{shown}: {item['msg'].removeprefix('Value error, ')}")
        fail("; ".join(problems))
        raise


def read_recipe(path: Path | None):
    """The recipe at ``path`` (``None``: the defaults); a bad recipe ends in a one-line error."""
    return call(load_recipe, path)


def vae_plan(rec: Any, flags: dict[str, str] | None = None, generator: GeneratorSettings | None = None, **updates):
    """The recipe's VAE plan with the command line's VAE options over its ``vae`` section."""
    section: VAESettings = merge(rec.vae, flags, **updates)
    from diffcxr_aug.generator.configs import resolve_config
    from diffcxr_aug.generator.vae import plan_vae

    return call(plan_vae, section, call(resolve_config, generator or rec.generator))

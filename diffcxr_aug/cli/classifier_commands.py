"""Commands that judge: ``train-classifier`` (timm classifiers on real and synthetic data) and ``evaluate``
(fidelity, faithfulness, privacy and compute of synthetic images)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from diffcxr_aug.cli.options import (
    SYNTHETIC_MODES,
    DeviceOpt,
    RecipeOpt,
    SeedOpt,
    app,
    call,
    check_choice,
    fail,
    field_help,
    merge,
    read_recipe,
)
from diffcxr_aug.config import ClassifierSection, EvaluateSection
from diffcxr_aug.types import MixedPrecision


@app.command(name="train-classifier")
def train_classifier(
    data: Annotated[Path, typer.Option("--data", help="folder with the real manifest.csv")],
    real_frac: Annotated[float, typer.Option("--real-frac", help="share of the real train split, in (0, 1]")],
    out: Annotated[Path, typer.Option("--out", help="output folder (results.csv, summary.md)")],
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="folder with a synthetic manifest")] = None,
    n_synthetic: Annotated[
        int | None, typer.Option("--n-synthetic", help=field_help(ClassifierSection, "n_synthetic"))
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help=f"{' | '.join(SYNTHETIC_MODES)} (with --synthetic; default mix)")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="any timm model name")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help='comma-separated, e.g. "0,1,2"')] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help=field_help(ClassifierSection, "epochs", "epochs"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=field_help(ClassifierSection, "batch_size", "batch size"))
    ] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help=field_help(ClassifierSection, "image_size"))
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train timm classifiers on a fraction of the real train split (optionally with synthetic data)."""
    check_choice(mode, SYNTHETIC_MODES, "--mode")
    if mode is not None and synthetic is None:
        fail(f"--mode {mode} needs --synthetic DIR: without synthetic images every run trains on real images only")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        fail(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2")
    rec = read_recipe(recipe)
    section: ClassifierSection = merge(
        rec.classifier,
        flags={"real_fracs": "--real-frac", "modes": "--mode"},
        model=model,
        real_fracs=[real_frac],
        modes=[mode or "mix"] if synthetic is not None else ["real"],
        seeds=seed_list,
        epochs=epochs,
        batch_size=batch_size,
        n_synthetic=n_synthetic,
        pretrained=pretrained,
        image_size=image_size,
    )
    from diffcxr_aug.augment.sweep import run_sweep

    path = call(run_sweep, data, out, section, synthetic=synthetic, device=device or rec.device)
    typer.echo(f"wrote {path}")


@app.command()
def evaluate(
    real: Annotated[Path, typer.Option("--real", help="folder with the real manifest.csv")],
    synthetic: Annotated[
        list[str],
        typer.Option(
            "--synthetic",
            help="folder with a synthetic manifest.csv; repeat as NAME=DIR to compare sets with one classifier",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="output folder (report.json, report.md, figures)")],
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help=field_help(
                EvaluateSection, "image_size", "image side of the reference classifier (default: synthetic)"
            ),
        ),
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option("--classifier", help="reuse this reference classifier folder; default: train one")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help=field_help(EvaluateSection, "model"))] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=field_help(EvaluateSection, "epochs"))] = None,
    features: Annotated[
        str | None,
        typer.Option("--features", help="comma-separated: " + field_help(EvaluateSection, "features")),
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option("--inception-weights", help=field_help(EvaluateSection, "inception_weights"))
    ] = None,
    xrv_weights: Annotated[
        str | None, typer.Option("--xrv-weights", help=field_help(EvaluateSection, "xrv_weights"))
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision",
            help=f"{' | '.join(get_args(MixedPrecision))}; {field_help(EvaluateSection, 'mixed_precision')}",
        ),
    ] = None,
    min_label_support: Annotated[
        int | None,
        typer.Option("--min-label-support", help=field_help(EvaluateSection, "min_label_support")),
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Fidelity (FID/KID, precision/recall, density/coverage, per label; in one or more feature spaces),
    faithfulness (mAUC, image-report alignment), privacy (nearest training image) and compute of synthetic sets."""
    rec = read_recipe(recipe)
    section: EvaluateSection = merge(
        rec.evaluate,
        flags={"image_size": "--size"},
        image_size=size,
        model=model,
        epochs=epochs,
        features=[f.strip() for f in features.split(",") if f.strip()] if features else None,
        inception_weights=inception_weights,
        xrv_weights=xrv_weights,
        mixed_precision=mixed_precision,
        min_label_support=min_label_support,
    )
    sets: dict[str, Path] = {}
    for item in synthetic:
        name, sep, folder = item.partition("=")
        if "/" in name or "\\" in name or not name:  # a plain path that holds '=' (runs/lr=1e-4/syn)
            name, sep = "", ""
        path = Path(folder) if sep else Path(item)
        key = name if sep else (path.name or str(path))
        if key in sets:
            fail(f"--synthetic {item!r}: the name {key!r} is used twice; write NAME=DIR with distinct names")
        sets[key] = path
    from diffcxr_aug.evaluation.report import evaluate as _evaluate

    path = call(
        _evaluate,
        real,
        sets,
        out,
        device=device or rec.device,
        seed=rec.seed if seed is None else seed,
        size=section.image_size,
        classifier=classifier,
        model_name=section.model,
        epochs=section.epochs,
        features=section.features,
        inception_weights=section.inception_weights,
        xrv_weights=section.xrv_weights,
        mixed_precision=section.mixed_precision,
        min_label_support=section.min_label_support,
    )
    typer.echo(f"wrote {path}")

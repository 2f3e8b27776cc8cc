"""Commands on datasets: ``prepare`` (index a dataset into the manifest), ``label`` (CheXpert labels for free-text
reports) and ``filter`` (Latent Noise Filtering, LNFS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffcxr_aug.cli.options import (
    FILTER_NORMALIZE,
    THRESHOLD_RULES,
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
    vae_plan,
)
from diffcxr_aug.config import DataSection, LabelSection
from diffcxr_aug.data.prepare import DATASETS
from diffcxr_aug.generator.settings import FilterSettings, VAESettings


@app.command()
def prepare(
    out: Annotated[Path, typer.Option("--out", help="output folder for manifest.csv, rejected.csv and images")],
    dataset: Annotated[
        str | None, typer.Argument(help=f"one of: {', '.join(DATASETS)} (default: the recipe's data.dataset)")
    ] = None,
    root: Annotated[Path | None, typer.Option("--root", help=field_help(DataSection, "root"))] = None,
    size: Annotated[int | None, typer.Option("--size", help=field_help(DataSection, "size"))] = None,
    seed: SeedOpt = None,
    n: Annotated[int | None, typer.Option("--n", help=field_help(DataSection, "n"))] = None,
    noise_rate: Annotated[
        float | None, typer.Option("--noise-rate", help=field_help(DataSection, "noise_rate"))
    ] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="csv: the label table")] = None,
    image_col: Annotated[str | None, typer.Option("--image-col", help="csv: column holding image paths")] = None,
    label_cols: Annotated[str | None, typer.Option("--label-cols", help='csv: label columns, "A,B"')] = None,
    report_col: Annotated[str | None, typer.Option("--report-col")] = None,
    patient_col: Annotated[str | None, typer.Option("--patient-col")] = None,
    view_col: Annotated[str | None, typer.Option("--view-col")] = None,
    recipe: RecipeOpt = None,
) -> None:
    """Index a dataset into the common manifest (phantom needs no --root)."""
    check_choice(dataset, DATASETS, "dataset")
    rec = read_recipe(recipe)
    section: DataSection = merge(
        rec.data,
        dataset=dataset,
        root=root,
        size=size,
        n=n,
        noise_rate=noise_rate,
        csv=csv,
        image_col=image_col,
        label_cols=[c.strip() for c in label_cols.split(",") if c.strip()] if label_cols else None,
        report_col=report_col,
        patient_col=patient_col,
        view_col=view_col,
    )
    if section.dataset != "phantom" and section.root is None:
        fail(f"prepare {section.dataset} needs --root (the dataset folder)")
    if section.root is not None and not section.root.exists():
        fail(f"--root {section.root}: no such folder")
    if section.dataset == "csv" and (section.csv is None or not section.label_cols):
        fail("prepare csv needs --csv FILE and --label-cols 'A,B'")
    from diffcxr_aug.augment.layout import prepare_data

    path = call(prepare_data, section, out, seed=rec.seed if seed is None else seed)
    typer.echo(f"wrote {path}")


@app.command()
def label(
    reports: Annotated[Path, typer.Option("--reports", exists=True, dir_okay=False, help="CSV of reports")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="output CSV: id + 14 CheXpert labels")],
    text_col: Annotated[str | None, typer.Option("--text-col", help=field_help(LabelSection, "text_col"))] = None,
    id_col: Annotated[str | None, typer.Option("--id-col", help=field_help(LabelSection, "id_col"))] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help=field_help(LabelSection, "checkpoint"))
    ] = None,
    bert: Annotated[str | None, typer.Option("--bert", help=field_help(LabelSection, "bert"))] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Label free-text reports with the 14 CheXpert observations."""
    rec = read_recipe(recipe)
    section: LabelSection = merge(rec.label, text_col=text_col, id_col=id_col, checkpoint=checkpoint, bert=bert)
    if section.bert is not None and section.checkpoint is None:
        fail("--bert only applies with --checkpoint (the rule-based labeler needs no model)")
    if section.checkpoint is not None and not section.checkpoint.is_file():
        fail(f"--checkpoint {section.checkpoint}: no such file")
    from diffcxr_aug.data.labeler import label_reports_file

    path = call(
        label_reports_file,
        reports,
        out,
        text_col=section.text_col,
        id_col=section.id_col,
        checkpoint=section.checkpoint,
        device=device or rec.device,
        bert=section.bert,
    )
    typer.echo(f"wrote {path}")


@app.command(name="filter")
def filter_(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv")],
    out: Annotated[Path, typer.Option("--out", help="output folder (scores.csv, kept manifest.csv, montage)")],
    vae: Annotated[Path | None, typer.Option("--vae", help="VAE folder or hub id to encode with")] = None,
    contamination: Annotated[
        float | None, typer.Option("--contamination", help=field_help(FilterSettings, "contamination"))
    ] = None,
    n_clusters: Annotated[
        int | None, typer.Option("--n-clusters", help=field_help(FilterSettings, "n_clusters", "k-means clusters"))
    ] = None,
    threshold: Annotated[
        str | None, typer.Option("--threshold", help=f"{' | '.join(THRESHOLD_RULES)} (see the recipe's filter)")
    ] = None,
    quantile: Annotated[
        float | None, typer.Option("--quantile", help=field_help(FilterSettings, "quantile", "threshold quantile"))
    ] = None,
    known_noisy: Annotated[
        Path | None, typer.Option("--known-noisy", help="CSV with an image_path column of images known to be noisy")
    ] = None,
    drop_views: Annotated[
        str | None,
        typer.Option(
            "--drop-views",
            help="views to drop by the manifest's view column before LNFS, e.g. LATERAL or 'LATERAL,UNKNOWN' "
            "('' for none; default: the recipe's filter.drop_views, none for filter alone)",
        ),
    ] = None,
    normalize: Annotated[
        str | None,
        typer.Option("--normalize", help=f"{' | '.join(FILTER_NORMALIZE)}: {field_help(FilterSettings, 'normalize')}"),
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=field_help(VAESettings, "size"))] = None,
    vae_steps: Annotated[
        int | None, typer.Option("--vae-steps", help=field_help(VAESettings, "steps", "without --vae: VAE steps"))
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Latent Noise Filtering (LNFS): drop noisy training images in the VAE latent space (the --vae folder, or
    without it the recipe's `vae`, trained first into OUT/vae). Rows whose view is in --drop-views go first."""
    check_choice(threshold, THRESHOLD_RULES, "--threshold")
    check_choice(normalize, FILTER_NORMALIZE, "--normalize")
    rec = read_recipe(recipe)
    section: FilterSettings = merge(
        rec.filter,
        contamination=contamination,
        n_clusters=n_clusters,
        threshold=threshold,
        quantile=quantile,
        known_noisy=known_noisy,
        normalize=normalize,
        drop_views=[v for v in drop_views.split(",") if v.strip()] if drop_views is not None else None,
    )
    if vae is not None and vae_steps is not None:
        fail("--vae-steps sets the VAE trained without --vae; with --vae VAE that one is used, none is trained")
    plan = vae_plan(rec, {"size": "--image-size", "steps": "--vae-steps"}, size=image_size, steps=vae_steps)
    if vae is not None and image_size is None and (vae / "metrics.json").is_file():
        image_size = json.loads((vae / "metrics.json").read_text(encoding="utf-8")).get("size")  # its own size
    from diffcxr_aug.generator.noise_filter import run_filter

    seed = rec.seed if seed is None else seed
    path = call(
        run_filter, data, out, section, vae=vae, device=device or rec.device, seed=seed, vae_plan=plan, size=image_size
    )
    typer.echo(f"wrote {path}")

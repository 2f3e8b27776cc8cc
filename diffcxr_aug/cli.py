"""The ``diffcxr-aug`` command line: a thin typer layer over plain functions that tests call in-process.

Each command validates its arguments, then hands over to the library. Bad input (a missing file, a
malformed manifest or recipe) ends with exit code 2 and a one-line reason on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from diffcxr_aug import __version__
from diffcxr_aug.config import (
    ClassifierSection,
    FilterSection,
    GeneratorSection,
    RecipeError,
    Section,
    SynthesizeSection,
    load_recipe,
)
from diffcxr_aug.data.prepare import DATASETS

app = typer.Typer(
    name="diffcxr-aug",
    help="Diff-CXR report-to-X-ray generation and synthetic-data augmentation for chest X-ray classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("diffcxr_aug")


MODES = ("mix", "pretrain-finetune")

DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed (reproduces the run)")]
RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", help="YAML recipe whose section supplies the defaults", dir_okay=False)
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    """Run a library entry point, turning bad input into a one-line error and exit code 2."""
    from diffcxr_aug.data.images import ImageReadError
    from diffcxr_aug.data.manifest import ManifestError

    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        _fail(f"not implemented yet: {err}")
    except KeyboardInterrupt:
        # Long jobs checkpoint as they go; the same command picks up where this one stopped.
        _fail("interrupted; rerun the same command to continue where it stopped", code=130)
    except (
        RecipeError,
        ManifestError,
        ImageReadError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        KeyError,
    ) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        _fail(message)


def _merge(section: Section, **updates: Any) -> Section:
    """Command-line options (those given) over the recipe section, validated together."""
    given = {k: v for k, v in updates.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except Exception as err:  # pydantic.ValidationError: report as bad input
        _fail(f"invalid option value: {err}")
        raise


def _recipe(path: Path | None):
    try:
        return load_recipe(path)
    except RecipeError as err:
        _fail(str(err))


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


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help=f"one of: {', '.join(DATASETS)}")],
    out: Annotated[Path, typer.Option("--out", help="output folder for manifest.csv, rejected.csv and images")],
    root: Annotated[Path | None, typer.Option("--root", help="dataset folder (not for phantom)")] = None,
    size: Annotated[int, typer.Option("--size", min=32, max=1024, help="image side in pixels for the cache")] = 128,
    seed: SeedOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="phantom: number of images")] = 2000,
    csv: Annotated[Path | None, typer.Option("--csv", help="csv: the label table")] = None,
    image_col: Annotated[str, typer.Option("--image-col", help="csv: column holding image paths")] = "image",
    label_cols: Annotated[str | None, typer.Option("--label-cols", help='csv: label columns, "A,B"')] = None,
    report_col: Annotated[str | None, typer.Option("--report-col")] = None,
    patient_col: Annotated[str | None, typer.Option("--patient-col")] = None,
    view_col: Annotated[str | None, typer.Option("--view-col")] = None,
) -> None:
    """Index a dataset into the common manifest (phantom needs no --root)."""
    if dataset not in DATASETS:
        _fail(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if dataset != "phantom" and root is None:
        _fail(f"prepare {dataset} needs --root (the dataset folder)")
    if root is not None and not root.exists():
        _fail(f"--root {root}: no such folder")
    if dataset == "csv" and (csv is None or not label_cols):
        _fail("prepare csv needs --csv FILE and --label-cols 'A,B'")
    from diffcxr_aug.data.prepare import prepare_dataset

    path = _call(
        prepare_dataset,
        dataset,
        out=out,
        root=root,
        size=size,
        seed=0 if seed is None else seed,
        n=n,
        csv=csv,
        image_col=image_col,
        label_cols=[c.strip() for c in label_cols.split(",") if c.strip()] if label_cols else [],
        report_col=report_col,
        patient_col=patient_col,
        view_col=view_col,
    )
    typer.echo(f"wrote {path}")


@app.command()
def label(
    reports: Annotated[Path, typer.Option("--reports", exists=True, dir_okay=False, help="CSV of reports")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="output CSV: id + 14 CheXpert labels")],
    text_col: Annotated[str, typer.Option("--text-col")] = "report",
    id_col: Annotated[str, typer.Option("--id-col")] = "ID",
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="CheXbert checkpoint (default: offline rule-based labeler)")
    ] = None,
    bert: Annotated[
        str | None,
        typer.Option(
            "--bert",
            help="CheXbert only: BERT config + tokenizer, a local folder or hub id "
            "(default: the checkpoint's folder if it holds config.json, else bert-base-uncased)",
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Label free-text reports with the 14 CheXpert observations."""
    if bert is not None and checkpoint is None:
        _fail("--bert only applies with --checkpoint (the rule-based labeler needs no model)")
    if checkpoint is not None and not checkpoint.is_file():
        _fail(f"--checkpoint {checkpoint}: no such file")
    from diffcxr_aug.data.labeler import label_reports_file

    path = _call(
        label_reports_file,
        reports,
        out,
        text_col=text_col,
        id_col=id_col,
        checkpoint=checkpoint,
        device=device,
        bert=bert,
    )
    typer.echo(f"wrote {path}")


@app.command(name="filter")
def filter_(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv")],
    out: Annotated[Path, typer.Option("--out", help="output folder (scores.csv, kept manifest.csv, montage)")],
    vae: Annotated[Path | None, typer.Option("--vae", help="VAE folder or hub id to encode with")] = None,
    contamination: Annotated[float | None, typer.Option("--contamination", min=0.0, max=0.5)] = None,
    n_clusters: Annotated[int | None, typer.Option("--n-clusters", min=2)] = None,
    threshold: Annotated[
        str | None,
        typer.Option("--threshold", help="contamination (flag that share) | quantile (of the normal images' scores)"),
    ] = None,
    quantile: Annotated[float | None, typer.Option("--quantile", min=0.0, max=1.0)] = None,
    known_noisy: Annotated[
        Path | None, typer.Option("--known-noisy", help="CSV with an image_path column of images known to be noisy")
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=16, help="image side the VAE encodes")] = None,
    vae_steps: Annotated[int | None, typer.Option("--vae-steps", min=1, help="steps of the VAE trained here")] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
) -> None:
    """Latent Noise Filtering (LNFS): drop noisy training images in the VAE latent space."""
    rec = _recipe(recipe)
    if threshold is not None and threshold not in ("contamination", "quantile"):
        _fail(f"unknown --threshold {threshold!r}; choose contamination or quantile")
    section: FilterSection = _merge(
        rec.filter,
        contamination=contamination,
        n_clusters=n_clusters,
        threshold=threshold,
        quantile=quantile,
        known_noisy=known_noisy,
        image_size=image_size,
        vae_steps=vae_steps,
    )
    from diffcxr_aug.generator.noise_filter import run_filter

    path = _call(run_filter, data, out, section, vae=vae, device=device, seed=rec.seed if seed is None else seed)
    typer.echo(f"wrote {path}")


@app.command(name="train-generator")
def train_generator(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv")],
    out: Annotated[Path, typer.Option("--out", help="pipeline folder (from_pretrained-loadable) and checkpoints")],
    recipe: RecipeOpt = None,
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: LDM + AVA-TLS; 2: DKIM adapter")] = 1,
    resume: Annotated[str | None, typer.Option("--resume", help="'latest' or a checkpoint folder")] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="registered generator config: tiny, phantom-64, phantom-128, paper-256"),
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1)] = None,
    time_limit_minutes: Annotated[
        float | None,
        typer.Option("--time-limit-minutes", min=0.01, help="stop (and save) at the first step past this wall time"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    ava_tls: Annotated[
        bool | None, typer.Option("--ava-tls/--no-ava-tls", help="AVA-TLS token squeeze + alignment, or the baseline")
    ] = None,
    num_tokens: Annotated[
        int | None, typer.Option("--num-tokens", min=1, help="K condition tokens (paper: 77)")
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option("--text-encoder", help="minilm | scratch | hf-hub:/local-dir: open_clip | HF name/path"),
    ] = None,
    vae: Annotated[
        str | None, typer.Option("--vae", help="VAE registry name (trained here first) or pretrained hub id / folder")
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
) -> None:
    """Train Diff-CXR (stage 1: text-conditioned LDM with AVA-TLS; stage 2: DKIM adapter)."""
    rec = _recipe(recipe)
    section: GeneratorSection = _merge(
        rec.generator,
        config=config,
        max_steps=max_steps,
        time_limit_minutes=time_limit_minutes,
        batch_size=batch_size,
        ava_tls=ava_tls,
        num_tokens=num_tokens,
        text_encoder=text_encoder,
        vae=vae,
    )
    from diffcxr_aug.generator.training import train_generator as _train

    path = _call(
        _train, data, out, section, stage=stage, resume=resume, device=device, seed=rec.seed if seed is None else seed
    )
    typer.echo(f"wrote {path}")


def _batch_size(value: str | None) -> int | str | None:
    """``--batch-size``: a positive integer or ``auto``."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        _fail(f"--batch-size {value!r}: expected a positive integer or 'auto'")
    return int(value)


@app.command()
def synthesize(
    n: Annotated[int, typer.Option("--n", min=1, help="number of images to generate")],
    generator: Annotated[Path, typer.Option("--generator", help="trained pipeline folder")],
    out: Annotated[Path, typer.Option("--out", help="output folder (manifest.csv, images, preview grid)")],
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="a manifest (its train split), a CSV or .txt file of reports, or a CSV of label rows "
            "(default: the generator's training manifest)",
        ),
    ] = None,
    labels_from: Annotated[
        Path | None,
        typer.Option("--labels-from", help="a manifest whose labels become template reports (no reports needed)"),
    ] = None,
    balance: Annotated[
        float | None,
        typer.Option("--balance", help="oversample rare findings until each label's positive share reaches this"),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1)] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", min=0.0)] = None,
    batch_size: Annotated[
        str | None, typer.Option("--batch-size", help="images a sampler call, or auto (CPU: 16; CUDA: what fits)")
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
) -> None:
    """Generate N labelled CXRs; rerunning the same command after an interruption finishes the job.

    Several processes: torchrun --nproc_per_node P -m diffcxr_aug.cli -- synthesize ... (the -- keeps torchrun
    from reading --n as its own option).
    """
    if prompts is not None and labels_from is not None:
        _fail("--prompts and --labels-from are two prompt sources; pass one of them")
    if balance is not None and not 0.0 < balance < 1.0:
        _fail(f"--balance {balance}: a positive share between 0 and 1, such as 0.2")
    rec = _recipe(recipe)
    base = rec.synthesize
    if prompts is not None or labels_from is not None:  # the command line's prompt source replaces the recipe's
        base = base.model_copy(update={"prompts": None, "labels_from": None})
    section: SynthesizeSection = _merge(
        base,
        n=n,
        steps=steps,
        guidance=guidance,
        batch_size=_batch_size(batch_size),
        prompts=prompts,
        labels_from=labels_from,
        balance=balance,
    )
    from diffcxr_aug.generator.synthesize import synthesize as _synthesize

    path = _call(_synthesize, generator, out, section, device=device, seed=rec.seed if seed is None else seed)
    typer.echo(f"wrote {path}")


@app.command(name="train-classifier")
def train_classifier(
    data: Annotated[Path, typer.Option("--data", help="folder with the real manifest.csv")],
    real_frac: Annotated[float, typer.Option("--real-frac", min=0.0, max=1.0, help="share of the real train split")],
    out: Annotated[Path, typer.Option("--out", help="output folder (results.csv, summary.md)")],
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="folder with a synthetic manifest")] = None,
    n_synthetic: Annotated[int | None, typer.Option("--n-synthetic", min=1)] = None,
    mode: Annotated[str, typer.Option("--mode", help="mix | pretrain-finetune (with --synthetic)")] = "mix",
    model: Annotated[str | None, typer.Option("--model", help="any timm model name")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help='comma-separated, e.g. "0,1,2"')] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=16, max=1024, help="training image side (default: timm's)")
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train timm classifiers on a fraction of the real train split (optionally with synthetic data)."""
    if real_frac <= 0.0:
        _fail("--real-frac must be greater than 0")
    if mode not in MODES:
        _fail(f"unknown --mode {mode!r}; choose one of: {', '.join(MODES)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2")
    rec = _recipe(recipe)
    modes = [mode] if synthetic is not None else ["real"]
    section: ClassifierSection = _merge(
        rec.classifier,
        model=model,
        real_fracs=[real_frac],
        modes=modes,
        seeds=seed_list,
        epochs=epochs,
        batch_size=batch_size,
        n_synthetic=n_synthetic,
        pretrained=pretrained,
        image_size=image_size,
    )
    from diffcxr_aug.augment.sweep import run_sweep

    path = _call(run_sweep, data, out, section, synthetic=synthetic, device=device)
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
        int | None, typer.Option("--size", min=16, help="image side of the reference classifier (default: synthetic)")
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option("--classifier", help="reuse this reference classifier folder; default: train one")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="epochs of the reference classifier")] = 8,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
) -> None:
    """Fidelity (FID/KID), faithfulness (mAUC), privacy (nearest training image) and compute of synthetic sets."""
    from diffcxr_aug.evaluation.report import evaluate as _evaluate

    sets: dict[str, Path] = {}
    for item in synthetic:
        name, sep, folder = item.partition("=")
        if "/" in name or "\\" in name or not name:  # a plain path that holds '=' (runs/lr=1e-4/syn)
            name, sep = "", ""
        path = Path(folder) if sep else Path(item)
        key = name if sep else (path.name or str(path))
        if key in sets:
            _fail(f"--synthetic {item!r}: the name {key!r} is used twice; write NAME=DIR with distinct names")
        sets[key] = path
    path = _call(
        _evaluate,
        real,
        sets,
        out,
        device=device,
        seed=0 if seed is None else seed,
        size=size,
        classifier=classifier,
        epochs=epochs,
    )
    typer.echo(f"wrote {path}")


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
    try:
        rec = load_recipe(recipe, set_ or [])
    except RecipeError as err:
        _fail(str(err))
    from diffcxr_aug.augment.experiment import run_experiment

    path = _call(run_experiment, rec, echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"report: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

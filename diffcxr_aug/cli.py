"""The ``diffcxr-aug`` command line: a thin typer layer over plain functions that tests call in-process.

Each command validates its arguments, then hands over to the library. Bad input (a missing file, a
malformed manifest or recipe, an option out of range: :class:`diffcxr_aug.errors.InputError` and pydantic's
validation of the options) ends with exit code 2 and a one-line reason on stderr; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import ValidationError

from diffcxr_aug import __version__
from diffcxr_aug.config import ClassifierSection, DataSection, EvaluateSection, LabelSection, load_recipe
from diffcxr_aug.data.prepare import DATASETS
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.configs import GENERATOR_CONFIGS
from diffcxr_aug.generator.settings import FilterSettings, GeneratorSettings, SynthesisSettings, VAESettings
from diffcxr_aug.types import (
    DEVICES,
    Attention,
    ClassifierMode,
    FilterNormalize,
    MixedPrecision,
    ReportSource,
    Sampler,
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


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _field_help(section: type[Settings], name: str, text: str | None = None) -> str:
    """An option's help from its recipe field: ``text`` (default: the field's description) and the allowed range."""
    field = section.model_fields[name]
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = [f"{symbols[key]} {getattr(m, key)}" for m in field.metadata for key in symbols if hasattr(m, key)]
    return " ".join(part for part in (text or field.description, f"[{', '.join(bounds)}]" if bounds else "") if part)


def _check_choice(value: str | None, choices: tuple[str, ...], flag: str) -> None:
    if value is not None and value not in choices:
        _fail(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")


def _check_device(value: str | None) -> str | None:
    """``--device``: checked (spelling, and that a CUDA device exists) before any work starts."""
    if value is not None:
        from diffcxr_aug.runtime import resolve_device

        try:
            resolve_device(value)
        except InputError as err:
            _fail(str(err))
    return value


DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", callback=_check_device, help=f"{' | '.join(DEVICES)} (default: the recipe's device)"),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed (reproduces the run; default: the recipe's)")]
RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", help="YAML recipe whose section supplies the defaults", dir_okay=False)
]


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    """Run a library entry point; bad input (an :class:`InputError`) ends in a one-line error and exit code 2.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as err:
        _fail(f"not implemented yet: {err}")
    except KeyboardInterrupt:
        # Long jobs checkpoint as they go; the same command picks up where this one stopped.
        _fail("interrupted; rerun the same command to continue where it stopped", code=130)
    except InputError as err:
        _fail(str(err))


def _merge(section: Settings, flags: dict[str, str] | None = None, **updates: Any) -> Settings:
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
        _fail("; ".join(problems))
        raise


def _recipe(path: Path | None):
    return _call(load_recipe, path)


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
    out: Annotated[Path, typer.Option("--out", help="output folder for manifest.csv, rejected.csv and images")],
    dataset: Annotated[
        str | None, typer.Argument(help=f"one of: {', '.join(DATASETS)} (default: the recipe's data.dataset)")
    ] = None,
    root: Annotated[Path | None, typer.Option("--root", help=_field_help(DataSection, "root"))] = None,
    size: Annotated[int | None, typer.Option("--size", help=_field_help(DataSection, "size"))] = None,
    seed: SeedOpt = None,
    n: Annotated[int | None, typer.Option("--n", help=_field_help(DataSection, "n"))] = None,
    noise_rate: Annotated[
        float | None, typer.Option("--noise-rate", help=_field_help(DataSection, "noise_rate"))
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
    _check_choice(dataset, DATASETS, "dataset")
    rec = _recipe(recipe)
    section: DataSection = _merge(
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
        _fail(f"prepare {section.dataset} needs --root (the dataset folder)")
    if section.root is not None and not section.root.exists():
        _fail(f"--root {section.root}: no such folder")
    if section.dataset == "csv" and (section.csv is None or not section.label_cols):
        _fail("prepare csv needs --csv FILE and --label-cols 'A,B'")
    from diffcxr_aug.augment.layout import prepare_data

    path = _call(prepare_data, section, out, seed=rec.seed if seed is None else seed)
    typer.echo(f"wrote {path}")


@app.command()
def label(
    reports: Annotated[Path, typer.Option("--reports", exists=True, dir_okay=False, help="CSV of reports")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="output CSV: id + 14 CheXpert labels")],
    text_col: Annotated[str | None, typer.Option("--text-col", help=_field_help(LabelSection, "text_col"))] = None,
    id_col: Annotated[str | None, typer.Option("--id-col", help=_field_help(LabelSection, "id_col"))] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help=_field_help(LabelSection, "checkpoint"))
    ] = None,
    bert: Annotated[str | None, typer.Option("--bert", help=_field_help(LabelSection, "bert"))] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Label free-text reports with the 14 CheXpert observations."""
    rec = _recipe(recipe)
    section: LabelSection = _merge(rec.label, text_col=text_col, id_col=id_col, checkpoint=checkpoint, bert=bert)
    if section.bert is not None and section.checkpoint is None:
        _fail("--bert only applies with --checkpoint (the rule-based labeler needs no model)")
    if section.checkpoint is not None and not section.checkpoint.is_file():
        _fail(f"--checkpoint {section.checkpoint}: no such file")
    from diffcxr_aug.data.labeler import label_reports_file

    path = _call(
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
        float | None, typer.Option("--contamination", help=_field_help(FilterSettings, "contamination"))
    ] = None,
    n_clusters: Annotated[
        int | None, typer.Option("--n-clusters", help=_field_help(FilterSettings, "n_clusters", "k-means clusters"))
    ] = None,
    threshold: Annotated[
        str | None, typer.Option("--threshold", help=f"{' | '.join(THRESHOLD_RULES)} (see the recipe's filter)")
    ] = None,
    quantile: Annotated[
        float | None, typer.Option("--quantile", help=_field_help(FilterSettings, "quantile", "threshold quantile"))
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
        typer.Option(
            "--normalize", help=f"{' | '.join(FILTER_NORMALIZE)}: {_field_help(FilterSettings, 'normalize')}"
        ),
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=_field_help(VAESettings, "size"))] = None,
    vae_steps: Annotated[
        int | None, typer.Option("--vae-steps", help=_field_help(VAESettings, "steps", "without --vae: VAE steps"))
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Latent Noise Filtering (LNFS): drop noisy training images in the VAE latent space (the --vae folder, or
    without it the recipe's `vae`, trained first into OUT/vae). Rows whose view is in --drop-views go first."""
    _check_choice(threshold, THRESHOLD_RULES, "--threshold")
    _check_choice(normalize, FILTER_NORMALIZE, "--normalize")
    rec = _recipe(recipe)
    section: FilterSettings = _merge(
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
        _fail("--vae-steps sets the VAE trained without --vae; with --vae VAE that one is used, none is trained")
    plan = _vae_plan(rec, {"size": "--image-size", "steps": "--vae-steps"}, size=image_size, steps=vae_steps)
    if vae is not None and image_size is None and (vae / "metrics.json").is_file():
        image_size = json.loads((vae / "metrics.json").read_text(encoding="utf-8")).get("size")  # its own size
    from diffcxr_aug.generator.noise_filter import run_filter

    seed = rec.seed if seed is None else seed
    path = _call(
        run_filter, data, out, section, vae=vae, device=device or rec.device, seed=seed, vae_plan=plan, size=image_size
    )
    typer.echo(f"wrote {path}")


def _vae_plan(rec: Any, flags: dict[str, str] | None = None, generator: GeneratorSettings | None = None, **updates):
    """The recipe's VAE plan with the command line's VAE options over its ``vae`` section."""
    section: VAESettings = _merge(rec.vae, flags, **updates)
    from diffcxr_aug.generator.configs import resolve_config
    from diffcxr_aug.generator.vae import plan_vae

    return _call(plan_vae, section, _call(resolve_config, generator or rec.generator))


@app.command(name="train-vae")
def train_vae(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv (its train split trains the VAE)")],
    out: Annotated[Path, typer.Option("--out", help="VAE folder (AutoencoderKL.from_pretrained-loadable)")],
    config: Annotated[
        str | None, typer.Option("--config", help=_field_help(VAESettings, "config", "registered KL-VAE"))
    ] = None,
    size: Annotated[int | None, typer.Option("--size", help=_field_help(VAESettings, "size"))] = None,
    steps: Annotated[int | None, typer.Option("--steps", help=_field_help(VAESettings, "steps"))] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=_field_help(VAESettings, "batch_size"))
    ] = None,
    crop_size: Annotated[int | None, typer.Option("--crop-size", help=_field_help(VAESettings, "crop_size"))] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Train the KL-VAE of the latent space that `filter --vae OUT` and `train-generator --vae OUT` encode with
    (the recipe's `vae` section; its unset keys are the generator config's)."""
    rec = _recipe(recipe)
    plan = _vae_plan(rec, config=config, size=size, steps=steps, batch_size=batch_size, crop_size=crop_size)
    if plan.pretrained is not None:
        _fail(f"the recipe's VAE is pretrained ({plan.pretrained}): pass it as --vae, there is nothing to train")
    from diffcxr_aug.data.manifest import read_manifest

    manifest = _call(read_manifest, data)
    seed = rec.seed if seed is None else seed
    _vae, metrics = _call(plan.train, manifest, out, device=device or rec.device, seed=seed)
    typer.echo(f"wrote {out} (val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f})")


@app.command(name="train-generator")
def train_generator(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv")],
    out: Annotated[Path, typer.Option("--out", help="pipeline folder (from_pretrained-loadable) and checkpoints")],
    recipe: RecipeOpt = None,
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: LDM + AVA-TLS; 2: DKIM adapter")] = 1,
    resume: Annotated[str | None, typer.Option("--resume", help="'latest' or a checkpoint folder")] = None,
    reseed: Annotated[
        bool,
        typer.Option(
            "--reseed",
            help="with --resume: continue with --seed's batches and noise instead of the checkpoint's seed (a branch "
            "of that checkpoint, e.g. several continuations of one model)",
        ),
    ] = False,
    generator: Annotated[
        Path | None,
        typer.Option("--generator", help="stage 2: the stage-1 pipeline folder the DKIM adapter trains on"),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help=f"registered generator config: {', '.join(GENERATOR_CONFIGS)}"),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", help="optimizer steps of the stage trained (max_steps, or stage2_steps with --stage 2)"
        ),
    ] = None,
    time_limit_minutes: Annotated[
        float | None, typer.Option("--time-limit-minutes", help=_field_help(GeneratorSettings, "time_limit_minutes"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=_field_help(GeneratorSettings, "batch_size"))
    ] = None,
    ava_tls: Annotated[
        bool | None, typer.Option("--ava-tls/--no-ava-tls", help="AVA-TLS token squeeze + alignment, or the baseline")
    ] = None,
    num_tokens: Annotated[
        int | None, typer.Option("--num-tokens", help=_field_help(GeneratorSettings, "num_tokens"))
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option("--text-encoder", help="minilm | scratch | hf-hub:/local-dir: open_clip | HF name/path"),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            "--vae", help="VAE folder (train-vae's --out) or pretrained hub id; a registry name trains it here first"
        ),
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision",
            help=f"{' | '.join(get_args(MixedPrecision))}; {_field_help(GeneratorSettings, 'mixed_precision')}",
        ),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention", help=f"{' | '.join(get_args(Attention))}; {_field_help(GeneratorSettings, 'attention')}"
        ),
    ] = None,
    compile_unet: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help=_field_help(GeneratorSettings, "compile"))
    ] = None,
    report_source: Annotated[
        str | None,
        typer.Option(
            "--report-source",
            help=f"{' | '.join(get_args(ReportSource))}; {_field_help(GeneratorSettings, 'report_source')}",
        ),
    ] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Train Diff-CXR (stage 1: text-conditioned LDM with AVA-TLS; stage 2: the DKIM adapter on a stage-1 model,
    `--stage 2 --generator STAGE1_DIR`)."""
    rec = _recipe(recipe)
    section: GeneratorSettings = _merge(
        rec.generator,
        {"stage2_steps": "--max-steps"},
        config=config,
        max_steps=max_steps if stage == 1 else None,
        stage2_steps=max_steps if stage == 2 else None,
        time_limit_minutes=time_limit_minutes,
        batch_size=batch_size,
        ava_tls=ava_tls,
        num_tokens=num_tokens,
        text_encoder=text_encoder,
        vae=vae,
        mixed_precision=mixed_precision,
        attention=attention,
        compile=compile_unet,
        report_source=report_source,
    )
    plan = _vae_plan(rec, generator=section)
    if section.vae is None:  # the recipe's VAE: pretrained, or its registered architecture trained here first
        section = section.model_copy(update={"vae": plan.pretrained or plan.config})
    from diffcxr_aug.generator.training import train_generator as _train

    seed = rec.seed if seed is None else seed
    path = _call(
        _train,
        data,
        out,
        section,
        stage=stage,
        resume=resume,
        device=device or rec.device,
        seed=seed,
        generator=generator,
        vae_plan=plan,
        reseed=reseed,
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
    n: Annotated[int, typer.Option("--n", help=_field_help(SynthesisSettings, "n", "number of images to generate"))],
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
    steps: Annotated[
        int | None, typer.Option("--steps", help=_field_help(SynthesisSettings, "steps", "sampler steps"))
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help=_field_help(SynthesisSettings, "guidance", "CFG scale"))
    ] = None,
    batch_size: Annotated[
        str | None, typer.Option("--batch-size", help="images a sampler call, or auto (CPU: 16; CUDA: what fits)")
    ] = None,
    dkim_scale: Annotated[
        float | None, typer.Option("--dkim-scale", help=_field_help(SynthesisSettings, "dkim_scale"))
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            "--sampler", help=f"{' | '.join(get_args(Sampler))}; {_field_help(SynthesisSettings, 'sampler')}"
        ),
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option("--mixed-precision", help=f"no | bf16; {_field_help(SynthesisSettings, 'mixed_precision')}"),
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
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
    section: SynthesisSettings = _merge(
        base,
        n=n,
        steps=steps,
        guidance=guidance,
        batch_size=_batch_size(batch_size),
        prompts=prompts,
        labels_from=labels_from,
        balance=balance,
        dkim_scale=dkim_scale,
        sampler=sampler,
        mixed_precision=mixed_precision,
    )
    from diffcxr_aug.generator.synthesize import synthesize as _synthesize

    seed = rec.seed if seed is None else seed
    path = _call(_synthesize, generator, out, section, device=device or rec.device, seed=seed)
    typer.echo(f"wrote {path}")


@app.command(name="train-classifier")
def train_classifier(
    data: Annotated[Path, typer.Option("--data", help="folder with the real manifest.csv")],
    real_frac: Annotated[float, typer.Option("--real-frac", help="share of the real train split, in (0, 1]")],
    out: Annotated[Path, typer.Option("--out", help="output folder (results.csv, summary.md)")],
    synthetic: Annotated[Path | None, typer.Option("--synthetic", help="folder with a synthetic manifest")] = None,
    n_synthetic: Annotated[
        int | None, typer.Option("--n-synthetic", help=_field_help(ClassifierSection, "n_synthetic"))
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help=f"{' | '.join(SYNTHETIC_MODES)} (with --synthetic; default mix)")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="any timm model name")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help='comma-separated, e.g. "0,1,2"')] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help=_field_help(ClassifierSection, "epochs", "epochs"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=_field_help(ClassifierSection, "batch_size", "batch size"))
    ] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help=_field_help(ClassifierSection, "image_size"))
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train timm classifiers on a fraction of the real train split (optionally with synthetic data)."""
    _check_choice(mode, SYNTHETIC_MODES, "--mode")
    if mode is not None and synthetic is None:
        _fail(f"--mode {mode} needs --synthetic DIR: without synthetic images every run trains on real images only")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2")
    rec = _recipe(recipe)
    section: ClassifierSection = _merge(
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

    path = _call(run_sweep, data, out, section, synthetic=synthetic, device=device or rec.device)
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
            help=_field_help(
                EvaluateSection, "image_size", "image side of the reference classifier (default: synthetic)"
            ),
        ),
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option("--classifier", help="reuse this reference classifier folder; default: train one")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help=_field_help(EvaluateSection, "model"))] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=_field_help(EvaluateSection, "epochs"))] = None,
    features: Annotated[
        str | None,
        typer.Option("--features", help="comma-separated: " + _field_help(EvaluateSection, "features")),
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option("--inception-weights", help=_field_help(EvaluateSection, "inception_weights"))
    ] = None,
    xrv_weights: Annotated[
        str | None, typer.Option("--xrv-weights", help=_field_help(EvaluateSection, "xrv_weights"))
    ] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Fidelity (FID/KID, precision/recall, density/coverage, per label; in one or more feature spaces),
    faithfulness (mAUC, image-report alignment), privacy (nearest training image) and compute of synthetic sets."""
    rec = _recipe(recipe)
    section: EvaluateSection = _merge(
        rec.evaluate,
        flags={"image_size": "--size"},
        image_size=size,
        model=model,
        epochs=epochs,
        features=[f.strip() for f in features.split(",") if f.strip()] if features else None,
        inception_weights=inception_weights,
        xrv_weights=xrv_weights,
    )
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
    from diffcxr_aug.evaluation.report import evaluate as _evaluate

    path = _call(
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would run every step and write the same files; the steps that scale run as their commands.
        _fail(
            "run drives one process and cannot run under torchrun / accelerate launch; run it in one process, and "
            "launch train-generator and synthesize with --recipe on several GPUs (README: Real data on GPUs)"
        )
    rec = _call(load_recipe, recipe, set_ or [])
    from diffcxr_aug.augment.experiment import run_experiment

    path = _call(run_experiment, rec, echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"report: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

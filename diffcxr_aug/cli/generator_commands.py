"""Commands of the generator: ``train-vae`` (the latent space), ``train-generator`` (Diff-CXR stage 1 and 2) and
``synthesize`` (labelled images from reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from diffcxr_aug.cli.options import (
    DeviceOpt,
    RecipeOpt,
    SeedOpt,
    app,
    call,
    fail,
    field_help,
    merge,
    read_recipe,
    vae_plan,
)
from diffcxr_aug.generator.configs import GENERATOR_CONFIGS
from diffcxr_aug.generator.settings import GeneratorSettings, SynthesisSettings, VAESettings
from diffcxr_aug.types import (
    Attention,
    MixedPrecision,
    ReportSource,
    Sampler,
)


@app.command(name="train-vae")
def train_vae(
    data: Annotated[Path, typer.Option("--data", help="folder with manifest.csv (its train split trains the VAE)")],
    out: Annotated[Path, typer.Option("--out", help="VAE folder (AutoencoderKL.from_pretrained-loadable)")],
    config: Annotated[
        str | None, typer.Option("--config", help=field_help(VAESettings, "config", "registered KL-VAE"))
    ] = None,
    size: Annotated[int | None, typer.Option("--size", help=field_help(VAESettings, "size"))] = None,
    steps: Annotated[int | None, typer.Option("--steps", help=field_help(VAESettings, "steps"))] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help=field_help(VAESettings, "batch_size"))] = None,
    crop_size: Annotated[int | None, typer.Option("--crop-size", help=field_help(VAESettings, "crop_size"))] = None,
    recipe: RecipeOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Train the KL-VAE of the latent space that `filter --vae OUT` and `train-generator --vae OUT` encode with
    (the recipe's `vae` section; its unset keys are the generator config's)."""
    rec = read_recipe(recipe)
    plan = vae_plan(rec, config=config, size=size, steps=steps, batch_size=batch_size, crop_size=crop_size)
    if plan.pretrained is not None:
        fail(f"the recipe's VAE is pretrained ({plan.pretrained}): pass it as --vae, there is nothing to train")
    from diffcxr_aug.data.manifest import read_manifest

    manifest = call(read_manifest, data)
    seed = rec.seed if seed is None else seed
    _vae, metrics = call(plan.train, manifest, out, device=device or rec.device, seed=seed)
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
        float | None, typer.Option("--time-limit-minutes", help=field_help(GeneratorSettings, "time_limit_minutes"))
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=field_help(GeneratorSettings, "batch_size"))
    ] = None,
    ava_tls: Annotated[
        bool | None, typer.Option("--ava-tls/--no-ava-tls", help="AVA-TLS token squeeze + alignment, or the baseline")
    ] = None,
    num_tokens: Annotated[
        int | None, typer.Option("--num-tokens", help=field_help(GeneratorSettings, "num_tokens"))
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
            help=f"{' | '.join(get_args(MixedPrecision))}; {field_help(GeneratorSettings, 'mixed_precision')}",
        ),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            "--attention", help=f"{' | '.join(get_args(Attention))}; {field_help(GeneratorSettings, 'attention')}"
        ),
    ] = None,
    compile_unet: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help=field_help(GeneratorSettings, "compile"))
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=field_help(GeneratorSettings, "gradient_checkpointing"),
        ),
    ] = None,
    report_source: Annotated[
        str | None,
        typer.Option(
            "--report-source",
            help=f"{' | '.join(get_args(ReportSource))}; {field_help(GeneratorSettings, 'report_source')}",
        ),
    ] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Train Diff-CXR (stage 1: text-conditioned LDM with AVA-TLS; stage 2: the DKIM adapter on a stage-1 model,
    `--stage 2 --generator STAGE1_DIR`)."""
    rec = read_recipe(recipe)
    section: GeneratorSettings = merge(
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
        gradient_checkpointing=gradient_checkpointing,
        report_source=report_source,
    )
    plan = vae_plan(rec, generator=section)
    if section.vae is None:  # the recipe's VAE: pretrained, or its registered architecture trained here first
        section = section.model_copy(update={"vae": plan.pretrained or plan.config})
    from diffcxr_aug.generator.training import train_generator as _train

    seed = rec.seed if seed is None else seed
    path = call(
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
        fail(f"--batch-size {value!r}: expected a positive integer or 'auto'")
    return int(value)


@app.command()
def synthesize(
    n: Annotated[int, typer.Option("--n", help=field_help(SynthesisSettings, "n", "number of images to generate"))],
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
        int | None, typer.Option("--steps", help=field_help(SynthesisSettings, "steps", "sampler steps"))
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help=field_help(SynthesisSettings, "guidance", "CFG scale"))
    ] = None,
    batch_size: Annotated[
        str | None, typer.Option("--batch-size", help="images a sampler call, or auto (CPU: 16; CUDA: what fits)")
    ] = None,
    dkim_scale: Annotated[
        float | None, typer.Option("--dkim-scale", help=field_help(SynthesisSettings, "dkim_scale"))
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option("--sampler", help=f"{' | '.join(get_args(Sampler))}; {field_help(SynthesisSettings, 'sampler')}"),
    ] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(
            "--mixed-precision",
            help=f"{' | '.join(get_args(MixedPrecision))}; {field_help(SynthesisSettings, 'mixed_precision')}",
        ),
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
        fail("--prompts and --labels-from are two prompt sources; pass one of them")
    if balance is not None and not 0.0 < balance < 1.0:
        fail(f"--balance {balance}: a positive share between 0 and 1, such as 0.2")
    rec = read_recipe(recipe)
    base = rec.synthesize
    if prompts is not None or labels_from is not None:  # the command line's prompt source replaces the recipe's
        base = base.model_copy(update={"prompts": None, "labels_from": None})
    section: SynthesisSettings = merge(
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
    path = call(_synthesize, generator, out, section, device=device or rec.device, seed=seed)
    typer.echo(f"wrote {path}")

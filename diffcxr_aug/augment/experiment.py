"""The whole loop from one recipe: prepare, filter, train-generator, synthesize, train-classifier, evaluate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffcxr_aug.config import Recipe, write_resolved_recipe

logger = logging.getLogger(__name__)


def experiment_paths(recipe: Recipe) -> dict[str, Path]:
    """Where each step of a recipe writes, under ``recipe.output_dir``."""
    root = recipe.output_dir
    return {
        "data": root / "data",
        "filtered": root / "filtered",
        "generator": root / "generator",
        "synthetic": root / "synthetic",
        "ceiling": root / "ceiling",
        "classifiers": root / "classifiers",
        "evaluation": root / "evaluation",
    }


def classifier_synthetic(recipe: Recipe, paths: dict[str, Path]) -> Path | None:
    """The synthetic folder the classifier sweep uses, from ``classifier.synthetic``.

    ``generated``: the synthesize step's output (when it exists); ``ceiling``: perfect-generator images
    rendered from the phantom world (``classifier.n_synthetic`` of them, default as many as the real
    train split holds); ``none``; or a folder path.
    """
    choice = recipe.classifier.synthetic
    if choice == "none":
        return None
    if choice == "generated":
        return paths["synthetic"] if (paths["synthetic"] / "manifest.csv").is_file() else None
    if choice == "ceiling":
        if recipe.data.dataset != "phantom":
            raise ValueError(
                f"classifier.synthetic: ceiling renders perfect images from the phantom world, but data.dataset "
                f"is {recipe.data.dataset!r}; use generated, none or a folder"
            )
        from diffcxr_aug.augment.ceiling import build_ceiling
        from diffcxr_aug.data.manifest import read_manifest

        n = recipe.classifier.n_synthetic or len(read_manifest(paths["data"]).split("train"))
        return build_ceiling(paths["ceiling"], n=n, size=recipe.data.size, seed=recipe.seed).parent
    return Path(choice)


def filter_vae_for_generator(recipe: Recipe, paths: dict[str, Path]) -> Path | None:
    """The KL-VAE the filter step trained, when the generator would train the very same one.

    Both train a registered KL-VAE with the recipe's seed; when the seed, architecture, image size, number of
    steps, batch size and crop size the filter's VAE was trained with (its ``metrics.json``) are the generator's, the
    generator loads it instead of training a second copy (the same weights: one training, not two). The
    filter's VAE has seen the whole manifest, noisy images included, while with
    ``use_filtered`` the generator would have trained its own on the kept images only; the VAE is an image codec
    (the denoiser, which decides what gets generated, still trains on the kept images only), and sharing it keeps
    filtered and unfiltered generators in one latent space, so their comparison isolates the filter.
    """
    from diffcxr_aug.generator.configs import resolve_config

    f, g = recipe.filter, recipe.generator
    folder = paths["filtered"] / "vae"
    if g.vae is not None or f.vae is not None or not (folder / "metrics.json").is_file():
        return None
    cfg = resolve_config(g)

    def whole(crop: int | None, size: int | None) -> int | None:
        return None if crop in (None, size) else crop  # a crop as large as the image is whole images

    # What was trained, as train_vae recorded it (not what the recipe says now: it may have changed since).
    trained = json.loads((folder / "metrics.json").read_text())
    wanted = (
        recipe.seed,
        cfg.vae,
        cfg.image_size,
        cfg.vae_steps,
        cfg.vae_batch_size,
        whole(cfg.vae_crop_size, cfg.image_size),
    )
    recorded = (
        trained.get("seed"),
        trained.get("config"),
        trained.get("size"),
        trained.get("steps"),
        trained.get("batch_size"),
        whole(trained.get("crop_size"), trained.get("size")),
    )
    return folder if recorded == wanted else None


def run_experiment(recipe: Recipe) -> Path:
    """Run the steps the recipe lists, in order. Each step is resumable, so rerunning finishes the job."""
    resolved = write_resolved_recipe(recipe)
    logger.info("Resolved recipe written to %s", resolved)
    paths = experiment_paths(recipe)
    seed = recipe.seed
    training_data = paths["data"]

    if "prepare" in recipe.steps:
        from diffcxr_aug.data.prepare import prepare_dataset

        d = recipe.data
        prepare_dataset(
            d.dataset,
            out=paths["data"],
            root=d.root,
            size=d.size,
            seed=seed,
            n=d.n,
            csv=d.csv,
            image_col=d.image_col,
            label_cols=d.label_cols,
            report_col=d.report_col,
            patient_col=d.patient_col,
            view_col=d.view_col,
        )
    if "filter" in recipe.steps and recipe.filter.enabled:
        from diffcxr_aug.generator.noise_filter import run_filter

        run_filter(paths["data"], paths["filtered"], recipe.filter, vae=None, device=recipe.device, seed=seed)
        if recipe.generator.use_filtered:
            training_data = paths["filtered"]
    if "train-generator" in recipe.steps:
        from diffcxr_aug.generator.training import train_generator

        generator_section = recipe.generator
        shared_vae = filter_vae_for_generator(recipe, paths)
        if shared_vae is not None:
            logger.info(
                "The generator uses the KL-VAE the filter trained (%s): same architecture, size, steps, batch, crop",
                shared_vae,
            )
            generator_section = generator_section.model_copy(update={"vae": str(shared_vae)})
        train_generator(
            training_data,
            paths["generator"],
            generator_section,
            stage=1,
            resume="latest",
            device=recipe.device,
            seed=seed,
        )
        if recipe.generator.dkim and recipe.generator.stage2_steps > 0:
            train_generator(
                training_data,
                paths["generator"],
                generator_section,
                stage=2,
                resume="latest",
                device=recipe.device,
                seed=seed,
            )
    if "synthesize" in recipe.steps:
        from diffcxr_aug.generator.synthesize import synthesize

        section = recipe.synthesize
        if section.prompts is None:
            section = section.model_copy(update={"prompts": paths["data"]})
        synthesize(paths["generator"], paths["synthetic"], section, device=recipe.device, seed=seed)
    if "train-classifier" in recipe.steps:
        from diffcxr_aug.classifiers.sweep import run_sweep

        section = recipe.classifier
        if section.image_size is None:
            # Train at the size the data was prepared at, rather than upsampling to the model's default.
            section = section.model_copy(update={"image_size": recipe.data.size})
        synthetic = classifier_synthetic(recipe, paths)
        run_sweep(paths["data"], paths["classifiers"], section, synthetic=synthetic, device=recipe.device)
    if "evaluate" in recipe.steps and recipe.evaluate.enabled:
        from diffcxr_aug.evaluation.report import evaluate

        section = recipe.evaluate
        evaluate(
            paths["data"],
            {"synthetic": paths["synthetic"]},
            paths["evaluation"],
            device=recipe.device,
            seed=seed,
            size=section.image_size or recipe.data.size,
            model_name=section.model,
            epochs=section.epochs,
        )
    return recipe.output_dir

"""One recipe's loop, step by step: prepare, train-vae, filter, train-generator, synthesize, train-classifier,
evaluate, each with the settings that decide its outputs (so a rerun skips what finished), then ``report.md``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffcxr_aug.augment.estimates import estimate_seconds
from diffcxr_aug.augment.layout import (
    DKIM_SOURCES,
    _synthetic_choices,
    classifier_synthetic,
    evaluated_sets,
    experiment_paths,
    filter_section,
    held_out_set,
    prepare_data,
    recipe_vae,
    recipe_vae_plan,
    run_order,
    sampled_sets,
    trains_dkim,
)
from diffcxr_aug.augment.results import RESULTS_NAME
from diffcxr_aug.augment.run_report import write_run_report
from diffcxr_aug.augment.steps import Step, StepLedger, run_steps
from diffcxr_aug.augment.sweep import run_sweep
from diffcxr_aug.config import EvaluateSection, Recipe, write_resolved_recipe
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.evaluation.report import evaluate
from diffcxr_aug.generator.noise_filter import run_filter
from diffcxr_aug.generator.settings import SynthesisSettings
from diffcxr_aug.generator.synthesize import synthesize
from diffcxr_aug.generator.training import train_generator

logger = logging.getLogger(__name__)


# Keys added after runs were recorded, with the value that reproduces what those runs did: left out of a step's
# settings while they hold it, so that a finished step is not redone only because the recipe schema grew.
_ADDED_LATER: dict[str, Any] = {
    "noise_rate": 0.05,
    "drop_views": [],
    "compile": False,
    "features": ["reference"],
    "inception_weights": None,
    "xrv_weights": None,
    "report_source": "report",
    "normalize": "none",
    "seeds": None,
    "drop_modalities": None,
    "gradient_checkpointing": False,
    "held_out": None,
    "prompt_split": "train",
}


# Keys added to one section after runs were recorded (older keys of the same name live in other sections), with the
# value that reproduces what those runs did: evaluate ran in fp32, as `auto` does on a CPU.
_ADDED_LATER_TO: dict[type, dict[str, Any]] = {EvaluateSection: {"mixed_precision": "auto", "min_label_support": 1}}


def _dump(section: Any) -> dict[str, Any]:
    dump = section.model_dump(mode="json")
    added = {**_ADDED_LATER, **_ADDED_LATER_TO.get(type(section), {})}
    return {k: v for k, v in dump.items() if not (k in added and v == added[k])}


def _synthesis_dump(section: Any, device: str) -> dict[str, Any]:
    """The synthesize section's settings; ``auto`` precision on a CPU written as ``no``, the fp32 it runs there, so
    that the steps recorded when ``no`` was the default (and ``auto`` no choice) are not redone."""
    import torch

    dump = _dump(section)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if dump["mixed_precision"] == "auto" and on_cpu:
        dump["mixed_precision"] = "no"
    return dump


def _prepare_step(recipe: Recipe, paths: dict[str, Path]) -> Step:
    def run() -> None:
        prepare_data(recipe.data, paths["data"], seed=recipe.seed)

    settings = {"data": _dump(recipe.data), "seed": recipe.seed}
    return Step("prepare", settings, [paths["data"]], [paths["data"] / "manifest.csv"], run)


def _vae_step(recipe: Recipe, paths: dict[str, Path], plan: Any, upstream: dict[str, str]) -> Step:
    def run() -> None:
        plan.train(read_manifest(paths["data"]), paths["vae"], device=recipe.device, seed=recipe.seed)

    settings = {"vae": dataclasses.asdict(plan), "seed": recipe.seed, "upstream": upstream}
    return Step("train-vae", settings, [paths["vae"]], [paths["vae"] / "metrics.json"], run)


def _filter_step(recipe: Recipe, paths: dict[str, Path], plan: Any, upstream: dict[str, str]) -> Step:
    vae, size = recipe_vae(recipe, paths, plan), plan.size
    section = filter_section(recipe)

    def run() -> None:
        run_filter(
            paths["data"], paths["filtered"], section, vae=vae, size=size, device=recipe.device, seed=recipe.seed
        )

    # The VAE enters as its plan (and the train-vae fingerprint upstream), not as a path: moving the output folder
    # does not redo the step.
    settings = {
        "filter": _dump(section),
        "vae": dataclasses.asdict(plan),
        "seed": recipe.seed,
        "upstream": upstream,
    }
    done = [paths["filtered"] / "manifest.csv", paths["filtered"] / "filter_report.json"]
    return Step("filter", settings, [paths["filtered"]], done, run)


# Keys a step changes on its own outputs and continues: more generator steps, more images, more sweep runs.
GENERATOR_EXTENDABLE = frozenset(
    f"generator.{k}"
    for k in ("max_steps", "time_limit_minutes", "checkpoint_every", "checkpoints_total_limit", "sample_every")
) | frozenset({"generator.log_every", "generator.stage2_steps", "generator.dkim", "generator.seeds"})
SYNTHESIZE_EXTENDABLE = frozenset({"synthesize.n", "synthesize.batch_size", "synthesize.held_out"}) | frozenset(
    f"sets.{name}" for name in DKIM_SOURCES
)
CLASSIFIER_EXTENDABLE = frozenset(
    f"classifier.{k}" for k in ("model", "real_fracs", "modes", "seeds", "synthetic", "num_workers", "workers")
)


def _generator_step(
    recipe: Recipe, paths: dict[str, Path], plan: Any, training_data: Path, upstream: dict[str, str]
) -> Step:
    dkim = trains_dkim(recipe)

    section = recipe.generator.model_copy(update={"vae": recipe_vae(recipe, paths, plan)})  # the recipe's one VAE

    seeds = recipe.generator.seeds

    def run() -> None:
        if seeds is not None:  # several stage-1 models, one per seed, one after another (each resumable)
            for seed in seeds:
                train_generator(
                    training_data, paths[f"generator-seed{seed}"], section, resume="latest", device=recipe.device,
                    seed=seed,
                )  # fmt: skip
            return
        train_generator(
            training_data, paths["generator"], section, resume="latest", device=recipe.device, seed=recipe.seed
        )
        if dkim:  # stage 2: the adapter on the frozen stage-1 model, in its own folder (stage 1 stays usable)
            train_generator(
                training_data,
                paths["generator-dkim"],
                section,
                stage=2,
                resume="latest",
                device=recipe.device,
                seed=recipe.seed,
                generator=paths["generator"],
            )

    settings = {
        "generator": _dump(recipe.generator),
        "vae": dataclasses.asdict(plan),
        "seed": recipe.seed,
        "training_data": training_data.name,
        "upstream": upstream,
    }
    if seeds is not None:
        folders = [paths[f"generator-seed{seed}"] for seed in seeds]
    else:
        folders = [paths["generator"]] + ([paths["generator-dkim"]] if dkim else [])
    done = [folder / name for folder in folders for name in ("model_index.json", "training_info.json")]
    return Step("train-generator", settings, folders, done, run, GENERATOR_EXTENDABLE)


def _synthesize_step(recipe: Recipe, paths: dict[str, Path], upstream: dict[str, str]) -> Step:
    section = recipe.synthesize
    if section.prompts is None and section.labels_from is None and recipe.generator.report_source == "labels":
        # A generator conditioned on template reports gets its prompts written from the labels the same way.
        section = section.model_copy(update={"labels_from": paths["data"]})
    elif section.prompts is None:
        section = section.model_copy(update={"prompts": paths["data"]})

    sets = sampled_sets(recipe)
    held_out = held_out_set(recipe)
    base = SynthesisSettings(**section.model_dump(exclude={"held_out"}))

    def run() -> None:
        for name, plan in sets.items():
            if len(sets) > 1:
                logger.info("Synthesizing the %s set with %s into %s", name, paths[plan.generator], paths[plan.out])
            job = base.model_copy(update={"balance": plan.balance})
            # Every set from the same prompts and noise (the recipe's seed), several generators included.
            synthesize(paths[plan.generator], paths[plan.out], job, device=recipe.device, seed=recipe.seed)
        if held_out is not None:
            logger.info(
                "Synthesizing %d images from the test split's reports into %s", section.held_out, paths[held_out.out]
            )
            job = base.model_copy(update={"n": section.held_out, "prompt_split": "test", "balance": None})
            synthesize(paths[held_out.generator], paths[held_out.out], job, device=recipe.device, seed=recipe.seed)

    settings = {"synthesize": _synthesis_dump(section, recipe.device), "seed": recipe.seed, "upstream": upstream}
    if len(sets) > 1:  # a recipe with one set keeps the settings (and the fingerprint) it always had
        settings["sets"] = {name: {"generator": p.generator, "balance": p.balance} for name, p in sets.items()}
    outputs = [paths[plan.out] for plan in [*sets.values(), *([held_out] if held_out else [])]]
    done = [folder / "manifest.csv" for folder in outputs]
    # A set added later (another generator seed) extends the step, as the DKIM sets do.
    added = {f"sets.{name}" for name, plan in sets.items() if plan.generator_seed is not None}
    extendable = SYNTHESIZE_EXTENDABLE | added
    return Step("synthesize", settings, outputs, done, run, extendable)


def _classifier_step(recipe: Recipe, paths: dict[str, Path], upstream: dict[str, str]) -> Step:
    section = recipe.classifier
    if section.image_size is None:
        # Train at the size the data was prepared at, rather than upsampling to the model's default.
        section = section.model_copy(update={"image_size": recipe.data.size})

    def run() -> None:
        synthetic = classifier_synthetic(recipe, paths)
        run_sweep(paths["data"], paths["classifiers"], section, synthetic=synthetic or None, device=recipe.device)

    settings = {"classifier": _dump(section), "seed": recipe.seed, "upstream": upstream}
    done = [paths["classifiers"] / RESULTS_NAME]
    outputs = [paths["classifiers"], paths["ceiling"]]
    return Step("train-classifier", settings, outputs, done, run, CLASSIFIER_EXTENDABLE)


def _evaluate_step(recipe: Recipe, paths: dict[str, Path], upstream: dict[str, str]) -> Step:
    section = recipe.evaluate

    def run() -> None:
        evaluate(
            paths["data"],
            evaluated_sets(recipe, paths),
            paths["evaluation"],
            device=recipe.device,
            seed=recipe.seed,
            size=section.image_size or recipe.data.size,
            model_name=section.model,
            epochs=section.epochs,
            features=section.features,
            inception_weights=section.inception_weights,
            xrv_weights=section.xrv_weights,
            mixed_precision=section.mixed_precision,
            min_label_support=section.min_label_support,
        )

    settings = {"evaluate": _dump(section), "seed": recipe.seed, "upstream": upstream}
    done = [paths["evaluation"] / "report.json"]
    return Step("evaluate", settings, [paths["evaluation"]], done, run)


def plan_steps(recipe: Recipe) -> list[Step]:
    """The steps the recipe lists, in order, each with the settings that decide its outputs.

    A step's settings hold the fingerprints of the steps whose outputs it reads, so a change anywhere upstream
    reaches every step after it. A step the recipe leaves out still feeds its fingerprint to the later ones
    (their inputs are its outputs from an earlier run, or a folder given by hand).
    """
    paths = experiment_paths(recipe)
    built: dict[str, Step] = {"prepare": _prepare_step(recipe, paths)}

    def upstream(*names: str) -> dict[str, str]:
        return {name: built[name].fingerprint for name in names if name in built}

    names = run_order(recipe)
    plan = recipe_vae_plan(recipe)  # the one latent space of every step that encodes
    if plan.pretrained is None:
        built["train-vae"] = _vae_step(recipe, paths, plan, upstream("prepare"))
    if recipe.filter.enabled and "filter" in names:
        built["filter"] = _filter_step(recipe, paths, plan, upstream("prepare", "train-vae"))
    training_data = paths["filtered"] if "filter" in built and recipe.generator.use_filtered else paths["data"]
    built["train-generator"] = _generator_step(
        recipe,
        paths,
        plan,
        training_data,
        upstream("prepare", "train-vae", *(["filter"] if training_data != paths["data"] else [])),
    )
    built["synthesize"] = _synthesize_step(recipe, paths, upstream("prepare", "train-generator"))
    uses_generated = any(choice in ("generated", *DKIM_SOURCES) for choice in _synthetic_choices(recipe))
    built["train-classifier"] = _classifier_step(
        recipe, paths, upstream("prepare", *(["synthesize"] if uses_generated else []))
    )
    if recipe.evaluate.enabled:
        built["evaluate"] = _evaluate_step(recipe, paths, upstream("prepare", "synthesize"))
    steps = [built[name] for name in names if name in built]
    for step in steps:
        step.estimate_seconds = estimate_seconds(step.name, recipe)
    return steps


def run_loop(recipe: Recipe, echo: Callable[[str], None] | None = None) -> Path:
    """Run the steps the recipe lists, in order, then write ``report.md``; returns the report's path.

    Each step is resumable, and ``steps.json`` records what each step ran with: rerunning the same recipe skips
    the steps that finished, finishes the one that was interrupted, and redoes (after moving the old outputs to
    ``superseded/``) the steps whose settings changed. See :mod:`diffcxr_aug.augment.steps`.
    """
    echo = echo or (lambda line: logger.info("%s", line))
    steps = plan_steps(recipe)  # a recipe that cannot run fails here, before anything is written
    resolved = write_resolved_recipe(recipe)
    logger.info("Resolved recipe written to %s", resolved)
    ledger = StepLedger(recipe.output_dir)
    happened = run_steps(steps, ledger, echo=echo)
    return write_run_report(recipe, experiment_paths(recipe), ledger, happened)

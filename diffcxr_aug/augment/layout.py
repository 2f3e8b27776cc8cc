"""Where a recipe's run writes and what it draws: the output folders, the VAE it encodes with, the image sets its
synthesize step samples and its classifiers and evaluation read, and the order of its steps.

Every step of :mod:`diffcxr_aug.augment.plan` and the ablation, the run report and the estimates read these, so
each question about a recipe's layout has one answer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from diffcxr_aug.augment.ceiling import build_ceiling
from diffcxr_aug.config import DataSection, Recipe
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.prepare import prepare_dataset
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.configs import resolve_config
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.generator.vae import VAEPlan, plan_vae


def prepare_data(section: DataSection, out: Path, seed: int = 0) -> Path:
    """:func:`~diffcxr_aug.data.prepare.prepare_dataset` with the settings of a recipe's ``data`` section."""
    return prepare_dataset(
        section.dataset,
        out=out,
        root=section.root,
        size=section.size,
        seed=seed,
        n=section.n,
        noise_rate=section.noise_rate,
        split_fractions=section.split_fractions,
        csv=section.csv,
        image_col=section.image_col,
        label_cols=section.label_cols,
        report_col=section.report_col,
        patient_col=section.patient_col,
        view_col=section.view_col,
    )


def experiment_paths(recipe: Recipe) -> dict[str, Path]:
    """Where each step of a recipe writes, under ``recipe.output_dir``."""
    root = recipe.output_dir
    per_seed = {}
    for seed in recipe.generator.seeds or []:  # one stage-1 model and image set per generator seed
        per_seed[f"generator-seed{seed}"] = root / f"generator-seed{seed}"
        per_seed[f"synthetic-seed{seed}"] = root / f"synthetic-seed{seed}"
    return {
        **per_seed,
        "data": root / "data",
        "vae": root / "vae",
        "filtered": root / "filtered",
        "generator": root / "generator",
        "generator-dkim": root / "generator-dkim",
        "synthetic": root / "synthetic",
        "synthetic-dkim": root / "synthetic-dkim",
        "synthetic-dkim-balanced": root / "synthetic-dkim-balanced",
        "synthetic-held-out": root / "synthetic-held-out",
        "ceiling": root / "ceiling",
        "classifiers": root / "classifiers",
        "evaluation": root / "evaluation",
    }


@dataclasses.dataclass(frozen=True)
class SampledSet:
    """One set the synthesize step samples: the generator folder and the output folder (keys of
    :func:`experiment_paths`) and the positive share its prompts are balanced to (``None``: as drawn)."""

    generator: str
    out: str
    balance: float | None
    generator_seed: int | None = None


DKIM_SOURCES = ("dkim", "dkim-balanced")


def _synthetic_choices(recipe: Recipe) -> list:
    choices = recipe.classifier.synthetic
    return choices if isinstance(choices, list) else [choices]


def sampled_sets(recipe: Recipe) -> dict[str, SampledSet]:
    """The sets the synthesize step samples, by source name, all from the same prompts and seeds.

    ``generated`` always (into ``synthetic/``): the recipe's final generator, or, when ``classifier.synthetic``
    lists a DKIM source, the stage-1 model, so that ``generated`` and ``dkim`` are stage 1 and stage 2 image for
    image. ``dkim`` (``synthetic-dkim/``) and ``dkim-balanced`` (``synthetic-dkim-balanced/``, the only set drawn
    with ``synthesize.balance`` when it is listed) when the classifier lists them.
    """
    choices = _synthetic_choices(recipe)
    dkim = [c for c in DKIM_SOURCES if c in choices]
    balance = recipe.synthesize.balance
    seeds = recipe.generator.seeds
    if seeds is not None:
        if dkim or trains_dkim(recipe):
            raise InputError(
                "generator.seeds trains several stage-1 models; stage 2 (DKIM) on each is not built: set "
                "generator.dkim: false and list generated (and ceiling) in classifier.synthetic"
            )
        return {
            f"generated-seed{s}": SampledSet(f"generator-seed{s}", f"synthetic-seed{s}", balance, generator_seed=s)
            for s in seeds
        }
    if not dkim:
        return {"generated": SampledSet(final_generator_key(recipe), "synthetic", balance)}
    if not trains_dkim(recipe):
        raise InputError(
            f"classifier.synthetic lists {' and '.join(dkim)}, the stage-2 (DKIM) model's images, but the recipe "
            "trains no stage 2: set generator.dkim: true (with generator.stage2_steps above 0)"
        )
    if "dkim-balanced" in dkim and balance is None:
        raise InputError(
            "classifier.synthetic lists dkim-balanced but synthesize.balance is not set: set it to the positive "
            "share each finding's prompts should reach (e.g. 0.3)"
        )
    plain = None if "dkim-balanced" in dkim else balance
    sets = {"generated": SampledSet("generator", "synthetic", plain)}
    if "dkim" in dkim:
        sets["dkim"] = SampledSet("generator-dkim", "synthetic-dkim", plain)
    if "dkim-balanced" in dkim:
        sets["dkim-balanced"] = SampledSet("generator-dkim", "synthetic-dkim-balanced", balance)
    return sets


def held_out_set(recipe: Recipe) -> SampledSet | None:
    """The set ``synthesize.held_out`` asks for: the recipe's final generator (with ``generator.seeds``, the first
    seed's) on the test split's reports, into ``synthetic-held-out/``; ``None`` when the recipe asks for none."""
    if recipe.synthesize.held_out is None:
        return None
    seeds = recipe.generator.seeds
    generator = f"generator-seed{seeds[0]}" if seeds else final_generator_key(recipe)
    return SampledSet(generator, "synthetic-held-out", None)


def classifier_synthetic(recipe: Recipe, paths: dict[str, Path]) -> dict[str, Path | dict[int, Path]]:
    """The named synthetic sets the classifier sweep uses, from ``classifier.synthetic`` (one choice or a list).

    ``generated``, ``dkim``, ``dkim-balanced``: the synthesize step's sets (:func:`sampled_sets`, when they
    exist); ``ceiling``: perfect-generator images rendered from the phantom world (``classifier.n_synthetic`` of
    them, default as many as the real train split holds); ``none``; or a folder path (named after the folder).
    With ``generator.seeds``, ``generated`` maps each generator seed to its set.
    """
    sampled = sampled_sets(recipe)
    sources: dict[str, Path | dict[int, Path]] = {}
    for choice in _synthetic_choices(recipe):
        if choice == "none":
            continue
        if choice == "generated" and recipe.generator.seeds is not None:
            # One set per generator seed, under one source name: results.csv's generator_seed tells them apart.
            by_seed = {
                plan.generator_seed: paths[plan.out]
                for plan in sampled.values()
                if (paths[plan.out] / "manifest.csv").is_file()
            }
            if by_seed:
                sources["generated"] = by_seed
            continue
        if choice in sampled:
            folder = paths[sampled[choice].out]
            if (folder / "manifest.csv").is_file():
                sources[choice] = folder
            continue
        if choice == "ceiling":
            sources["ceiling"] = _ceiling(recipe, paths)
            continue
        folder = Path(choice)
        sources[folder.name] = folder
    return sources


def _ceiling(recipe: Recipe, paths: dict[str, Path]) -> Path:
    if recipe.data.dataset != "phantom":
        raise InputError(
            f"classifier.synthetic: ceiling renders perfect images from the phantom world, but data.dataset "
            f"is {recipe.data.dataset!r}; use generated, none or a folder"
        )
    n = recipe.classifier.n_synthetic or len(read_manifest(paths["data"]).split("train"))
    return build_ceiling(paths["ceiling"], n=n, size=recipe.data.size, seed=recipe.seed).parent


def recipe_vae_plan(recipe: Recipe) -> VAEPlan:
    """The recipe's one latent space (:class:`~diffcxr_aug.generator.vae.VAEPlan`): its ``vae`` section over the
    generator config's VAE. When the recipe trains the generator, the VAE's image size must be the generator's:
    the filter encodes at that size, so that it works in the latent space the generator trains in."""
    cfg = resolve_config(recipe.generator)
    plan = plan_vae(recipe.vae, cfg)
    if "train-generator" in recipe.steps and plan.size != cfg.image_size:
        raise InputError(
            f"vae.size is {plan.size} but the generator config {cfg.name!r} trains at {cfg.image_size} px: one "
            f"latent space needs one image size; set vae.size: {cfg.image_size} (or leave it unset)"
        )
    return plan


def recipe_vae(recipe: Recipe, paths: dict[str, Path], plan: Any = None) -> str:
    """The VAE the filter and the generator encode with: the pretrained one, or the ``train-vae`` step's folder
    (``plan``: the recipe's :func:`recipe_vae_plan`, when the caller has it)."""
    plan = plan if plan is not None else recipe_vae_plan(recipe)
    return plan.pretrained if plan.pretrained is not None else str(paths["vae"])


def filter_section(recipe: Recipe) -> FilterSettings:
    """The recipe's ``filter`` with ``drop_views`` resolved: unset, it drops LATERAL rows when the run trains the
    generator (a lateral film in a frontal-report training set is the commonest noise) and none otherwise."""
    if recipe.filter.drop_views is not None:
        return recipe.filter
    trains = "train-generator" in run_order(recipe)
    return recipe.filter.model_copy(update={"drop_views": ["LATERAL"] if trains else []})


def trains_dkim(recipe: Recipe) -> bool:
    """Whether the recipe trains stage 2 (the DKIM adapter) after stage 1."""
    return recipe.generator.dkim and recipe.generator.stage2_steps > 0


def final_generator_key(recipe: Recipe) -> str:
    return "generator-dkim" if trains_dkim(recipe) else "generator"


def final_generator(recipe: Recipe, paths: dict[str, Path]) -> Path:
    """The recipe's generator: the stage-2 (DKIM) model when the recipe trains one, else stage 1."""
    return paths[final_generator_key(recipe)]


def evaluated_sets(recipe: Recipe, paths: dict[str, Path]) -> dict[str, Path]:
    """The sets the evaluate step judges in one report: ``synthetic`` (the synthesize step's set), or, when the
    recipe samples several, each by its source name (so the report pairs stage 1 and stage 2 image for image);
    with ``synthesize.held_out``, the held-out set alone (``held-out``: images of reports the generator never saw,
    beside the real test films they describe)."""
    if held_out_set(recipe) is not None:
        return {"held-out": paths["synthetic-held-out"]}
    sets = sampled_sets(recipe)
    if len(sets) == 1:
        return {"synthetic": paths["synthetic"]}
    return {name: paths[plan.out] for name, plan in sets.items()}


def run_order(recipe: Recipe) -> list[str]:
    """The recipe's steps, with ``train-vae`` before ``filter`` and ``train-generator`` when the list leaves it
    out (recipes written before the step existed): both encode with the VAE it trains."""
    names = list(recipe.steps)
    if "train-vae" not in names:
        users = [i for i, name in enumerate(names) if name in ("filter", "train-generator")]
        if users:
            names.insert(users[0], "train-vae")
    return names

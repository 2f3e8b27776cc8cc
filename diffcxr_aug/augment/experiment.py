"""The whole loop from one recipe: prepare, train-vae, filter, train-generator, synthesize, train-classifier,
evaluate, and a report of the run (``report.md``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffcxr_aug.augment.steps import Step, StepLedger, run_steps
from diffcxr_aug.config import FilterSection, Recipe, write_resolved_recipe
from diffcxr_aug.errors import InputError

logger = logging.getLogger(__name__)


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
    from diffcxr_aug.augment.ceiling import build_ceiling
    from diffcxr_aug.data.manifest import read_manifest

    n = recipe.classifier.n_synthetic or len(read_manifest(paths["data"]).split("train"))
    return build_ceiling(paths["ceiling"], n=n, size=recipe.data.size, seed=recipe.seed).parent


def recipe_vae_plan(recipe: Recipe):
    """The recipe's one latent space (:class:`~diffcxr_aug.generator.vae.VAEPlan`): its ``vae`` section over the
    generator config's VAE. When the recipe trains the generator, the VAE's image size must be the generator's:
    the filter encodes at that size, so that it works in the latent space the generator trains in."""
    from diffcxr_aug.generator.configs import resolve_config
    from diffcxr_aug.generator.vae import plan_vae

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
}


def _dump(section: Any) -> dict[str, Any]:
    dump = section.model_dump(mode="json")
    return {k: v for k, v in dump.items() if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}


def filter_section(recipe: Recipe) -> FilterSection:
    """The recipe's ``filter`` with ``drop_views`` resolved: unset, it drops LATERAL rows when the run trains the
    generator (a lateral film in a frontal-report training set is the commonest noise) and none otherwise."""
    if recipe.filter.drop_views is not None:
        return recipe.filter
    trains = "train-generator" in run_order(recipe)
    return recipe.filter.model_copy(update={"drop_views": ["LATERAL"] if trains else []})


def _prepare_step(recipe: Recipe, paths: dict[str, Path]) -> Step:
    from diffcxr_aug.data.prepare import prepare_data

    def run() -> None:
        prepare_data(recipe.data, paths["data"], seed=recipe.seed)

    settings = {"data": _dump(recipe.data), "seed": recipe.seed}
    return Step("prepare", settings, [paths["data"]], [paths["data"] / "manifest.csv"], run)


def _vae_step(recipe: Recipe, paths: dict[str, Path], plan: Any, upstream: dict[str, str]) -> Step:
    from diffcxr_aug.data.manifest import read_manifest

    def run() -> None:
        plan.train(read_manifest(paths["data"]), paths["vae"], device=recipe.device, seed=recipe.seed)

    settings = {"vae": dataclasses.asdict(plan), "seed": recipe.seed, "upstream": upstream}
    return Step("train-vae", settings, [paths["vae"]], [paths["vae"] / "metrics.json"], run)


def _filter_step(recipe: Recipe, paths: dict[str, Path], plan: Any, upstream: dict[str, str]) -> Step:
    from diffcxr_aug.generator.noise_filter import run_filter

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
SYNTHESIZE_EXTENDABLE = frozenset({"synthesize.n", "synthesize.batch_size"}) | frozenset(
    f"sets.{name}" for name in DKIM_SOURCES
)
CLASSIFIER_EXTENDABLE = frozenset(
    f"classifier.{k}" for k in ("real_fracs", "modes", "seeds", "synthetic", "num_workers")
)


def _generator_step(
    recipe: Recipe, paths: dict[str, Path], plan: Any, training_data: Path, upstream: dict[str, str]
) -> Step:
    from diffcxr_aug.generator.training import train_generator

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


def trains_dkim(recipe: Recipe) -> bool:
    """Whether the recipe trains stage 2 (the DKIM adapter) after stage 1."""
    return recipe.generator.dkim and recipe.generator.stage2_steps > 0


def final_generator_key(recipe: Recipe) -> str:
    return "generator-dkim" if trains_dkim(recipe) else "generator"


def final_generator(recipe: Recipe, paths: dict[str, Path]) -> Path:
    """The recipe's generator: the stage-2 (DKIM) model when the recipe trains one, else stage 1."""
    return paths[final_generator_key(recipe)]


def _synthesize_step(recipe: Recipe, paths: dict[str, Path], upstream: dict[str, str]) -> Step:
    from diffcxr_aug.generator.synthesize import synthesize

    section = recipe.synthesize
    if section.prompts is None and section.labels_from is None and recipe.generator.report_source == "labels":
        # A generator conditioned on template reports gets its prompts written from the labels the same way.
        section = section.model_copy(update={"labels_from": paths["data"]})
    elif section.prompts is None:
        section = section.model_copy(update={"prompts": paths["data"]})

    sets = sampled_sets(recipe)

    def run() -> None:
        for name, plan in sets.items():
            if len(sets) > 1:
                logger.info("Synthesizing the %s set with %s into %s", name, paths[plan.generator], paths[plan.out])
            job = section.model_copy(update={"balance": plan.balance})
            # Every set from the same prompts and noise (the recipe's seed), several generators included.
            synthesize(paths[plan.generator], paths[plan.out], job, device=recipe.device, seed=recipe.seed)

    settings = {"synthesize": _dump(section), "seed": recipe.seed, "upstream": upstream}
    if len(sets) > 1:  # a recipe with one set keeps the settings (and the fingerprint) it always had
        settings["sets"] = {name: {"generator": p.generator, "balance": p.balance} for name, p in sets.items()}
    outputs = [paths[plan.out] for plan in sets.values()]
    done = [folder / "manifest.csv" for folder in outputs]
    # A set added later (another generator seed) extends the step, as the DKIM sets do.
    added = {f"sets.{name}" for name, plan in sets.items() if plan.generator_seed is not None}
    extendable = SYNTHESIZE_EXTENDABLE | added
    return Step("synthesize", settings, outputs, done, run, extendable)


def _classifier_step(recipe: Recipe, paths: dict[str, Path], upstream: dict[str, str]) -> Step:
    from diffcxr_aug.augment.results import RESULTS_NAME
    from diffcxr_aug.augment.sweep import run_sweep

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
    from diffcxr_aug.evaluation.report import evaluate

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
        )

    settings = {"evaluate": _dump(section), "seed": recipe.seed, "upstream": upstream}
    done = [paths["evaluation"] / "report.json"]
    return Step("evaluate", settings, [paths["evaluation"]], done, run)


def evaluated_sets(recipe: Recipe, paths: dict[str, Path]) -> dict[str, Path]:
    """The sets the evaluate step judges in one report: ``synthetic`` (the synthesize step's set), or, when the
    recipe samples several, each by its source name (so the report pairs stage 1 and stage 2 image for image)."""
    sets = sampled_sets(recipe)
    if len(sets) == 1:
        return {"synthetic": paths["synthetic"]}
    return {name: paths[plan.out] for name, plan in sets.items()}


def plan_steps(recipe: Recipe) -> list[Step]:
    """The steps the recipe lists, in order, each with the settings that decide its outputs.

    A step's settings hold the fingerprints of the steps whose outputs it reads, so a change anywhere upstream
    reaches every step after it. A step the recipe leaves out still feeds its fingerprint to the later ones
    (their inputs are its outputs from an earlier run, or a folder given by hand).
    """
    from diffcxr_aug.augment.estimates import estimate_seconds

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


def run_order(recipe: Recipe) -> list[str]:
    """The recipe's steps, with ``train-vae`` before ``filter`` and ``train-generator`` when the list leaves it
    out (recipes written before the step existed): both encode with the VAE it trains."""
    names = list(recipe.steps)
    if "train-vae" not in names:
        users = [i for i, name in enumerate(names) if name in ("filter", "train-generator")]
        if users:
            names.insert(users[0], "train-vae")
    return names


def run_experiment(recipe: Recipe, echo: Callable[[str], None] | None = None) -> Path:
    """Run the steps the recipe lists, in order, then write ``report.md``; returns the report's path. A recipe
    with ablation arms runs each arm instead and returns its table (:func:`~.ablation.run_ablation`).

    Each step is resumable, and ``steps.json`` records what each step ran with: rerunning the same recipe skips
    the steps that finished, finishes the one that was interrupted, and redoes (after moving the old outputs to
    ``superseded/``) the steps whose settings changed. See :mod:`diffcxr_aug.augment.steps`.
    """
    from diffcxr_aug.augment.run_report import write_run_report

    if recipe.ablation is not None and recipe.ablation.arms:
        from diffcxr_aug.augment.ablation import run_ablation

        return run_ablation(recipe, echo=echo)
    echo = echo or (lambda line: logger.info("%s", line))
    steps = plan_steps(recipe)  # a recipe that cannot run fails here, before anything is written
    resolved = write_resolved_recipe(recipe)
    logger.info("Resolved recipe written to %s", resolved)
    ledger = StepLedger(recipe.output_dir)
    happened = run_steps(steps, ledger, echo=echo)
    return write_run_report(recipe, experiment_paths(recipe), ledger, happened)

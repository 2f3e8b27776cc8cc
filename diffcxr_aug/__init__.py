"""diffcxr-aug: report-to-chest-X-ray generation (Diff-CXR) and synthetic-data augmentation.

The entry points a user looks for are importable from here::

    from diffcxr_aug import DiffCXRPipeline, load_recipe, run_experiment

    report_md = run_experiment(load_recipe("recipes/quickstart.yaml"))
    pipe = DiffCXRPipeline.from_pretrained("runs/quickstart/generator")

They are imported on first use (a module-level ``__getattr__``, PEP 562), so ``import diffcxr_aug`` stays light
(no torch) and the root package depends on none of its layers until a name is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffcxr_aug.data.labels import CHEXPERT_LABELS, NIH_LABELS

__version__ = "0.1.0"

# name -> the module that defines it. One line per entry point; the docs' API reference lists the same names.
_LAZY: dict[str, str] = {
    # the whole loop from a recipe
    "Recipe": "diffcxr_aug.config",
    "load_recipe": "diffcxr_aug.config",
    "run_experiment": "diffcxr_aug.augment.experiment",
    # one step each, as the command line runs them
    "prepare_dataset": "diffcxr_aug.data.prepare",
    "run_filter": "diffcxr_aug.generator.noise_filter.driver",
    "train_generator": "diffcxr_aug.generator.training",
    "synthesize": "diffcxr_aug.generator.synthesize",
    "train_classifier": "diffcxr_aug.classifiers.train",
    "evaluate": "diffcxr_aug.evaluation.report",
    # the models
    "DiffCXRPipeline": "diffcxr_aug.generator.pipeline",
    "LatentNoiseFilter": "diffcxr_aug.generator.noise_filter.estimator",
    # the settings the step functions take (a recipe's vae, filter, generator and synthesize sections)
    "VAESettings": "diffcxr_aug.generator.settings",
    "FilterSettings": "diffcxr_aug.generator.settings",
    "GeneratorSettings": "diffcxr_aug.generator.settings",
    "SynthesisSettings": "diffcxr_aug.generator.settings",
}

__all__ = [
    "CHEXPERT_LABELS",
    "NIH_LABELS",
    "DiffCXRPipeline",
    "FilterSettings",
    "GeneratorSettings",
    "LatentNoiseFilter",
    "Recipe",
    "SynthesisSettings",
    "VAESettings",
    "__version__",
    "evaluate",
    "load_recipe",
    "prepare_dataset",
    "run_experiment",
    "run_filter",
    "synthesize",
    "train_classifier",
    "train_generator",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from diffcxr_aug.augment.experiment import run_experiment
    from diffcxr_aug.classifiers.train import train_classifier
    from diffcxr_aug.config import Recipe, load_recipe
    from diffcxr_aug.data.prepare import prepare_dataset
    from diffcxr_aug.evaluation.report import evaluate
    from diffcxr_aug.generator.noise_filter.driver import run_filter
    from diffcxr_aug.generator.noise_filter.estimator import LatentNoiseFilter
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline
    from diffcxr_aug.generator.settings import FilterSettings, GeneratorSettings, SynthesisSettings, VAESettings
    from diffcxr_aug.generator.synthesize import synthesize
    from diffcxr_aug.generator.training import train_generator


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffcxr_aug' has no attribute {name!r}; it exports: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup finds it without calling __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

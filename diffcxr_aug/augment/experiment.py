"""The whole loop from one recipe: ``diffcxr-aug run RECIPE.yaml`` and :func:`run_experiment`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffcxr_aug.augment.ablation import run_ablation
from diffcxr_aug.augment.plan import run_loop
from diffcxr_aug.config import Recipe


def run_experiment(recipe: Recipe, echo: Callable[[str], None] | None = None) -> Path:
    """Run the recipe's loop (:func:`~diffcxr_aug.augment.plan.run_loop`: prepare, train-vae, filter,
    train-generator, synthesize, train-classifier, evaluate, then ``report.md``) and return the report's path; a
    recipe with ablation arms runs the loop once per arm and returns the arms' table
    (:func:`~diffcxr_aug.augment.ablation.run_ablation`).

    Resumable: rerunning the same recipe skips every step that finished with the same settings.
    """
    if recipe.ablation is not None and recipe.ablation.arms:
        return run_ablation(recipe, echo=echo)
    return run_loop(recipe, echo=echo)

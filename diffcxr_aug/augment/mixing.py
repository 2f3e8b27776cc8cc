"""Real and synthetic training data together: a synthetic set aligned to the real labels, and the stages
each training mode runs.

Modes:
    * ``real``: the real subset alone (the baseline).
    * ``mix``: one training set, the real subset and the synthetic images concatenated.
    * ``pretrain-finetune``: train on the synthetic images, then fine-tune those weights on the real subset.
    * ``synthetic-only``: the synthetic images alone, no real training image (a hospital that shares a generator
      or its images instead of patients' films); validation and test stay real. Its one stage is
      ``pretrain-finetune``'s first, so the two modes share that model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np

from diffcxr_aug.config import ClassifierMode
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.errors import InputError

logger = logging.getLogger(__name__)

Mode = ClassifierMode
MODES: tuple[str, ...] = get_args(ClassifierMode)


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise InputError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def load_synthetic(
    path: str | os.PathLike,
    label_names: Sequence[str],
    n_synthetic: int | None = None,
    seed: int = 0,
) -> Manifest:
    """Read a synthetic (or any extra) manifest for training against the real label set.

    Every row is used, whatever its ``split``: synthetic images only ever train, while validation and test
    stay the real splits. Labels are matched by name: a real label the synthetic manifest lacks is NaN
    (unknown, masked in the loss) on its rows, and a synthetic label the real set lacks is ignored.

    Args:
        path: a folder holding ``manifest.csv`` (or the file).
        label_names: the real manifest's labels, the classifier's outputs.
        n_synthetic: use a random subset of this many rows (default: all of them).
        seed: fixes that subset, so every mode at one seed trains on the same synthetic images.
    """
    # Patient ids of generated images are arbitrary, and none of them is in a real split: no leakage check.
    manifest = read_manifest(path, check_splits=False)
    shared = [name for name in label_names if name in manifest.label_names]
    if not shared:
        raise InputError(
            f"{manifest.source}: no label in common with the real data. Real labels: {list(label_names)}; "
            f"synthetic labels: {manifest.label_names}. Name the synthetic label columns as the real ones."
        )
    missing = [name for name in label_names if name not in manifest.label_names]
    extra = [name for name in manifest.label_names if name not in label_names]
    if missing or extra:
        logger.warning(
            "%s: labels aligned by name; missing (NaN, masked): %s; ignored: %s",
            manifest.source,
            ", ".join(missing) or "none",
            ", ".join(extra) or "none",
        )
    if n_synthetic is not None:
        if n_synthetic > len(manifest):
            raise InputError(
                f"n_synthetic={n_synthetic} but {manifest.source} holds only {len(manifest)} images; "
                "ask for fewer or synthesize more"
            )
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(manifest), size=n_synthetic, replace=False))
        manifest = manifest.subset(manifest.frame.index[keep])
    return manifest


@dataclass
class Stage:
    """One training stage: a name (used in logs and checkpoint folders) and the manifests it trains on."""

    name: str
    manifests: list[Manifest]
    # Fine-tuning also scores the weights it starts from, so it can keep them if it only hurts.
    evaluate_start: bool = False
    # A stage that trains on no real training image gives the same model at every real fraction.
    shared: bool = False


def training_stages(mode: str, real: Manifest, synthetic: Manifest | None) -> list[Stage]:
    """The stages a mode runs, in order.

    Raises:
        InputError: an unknown mode, or a synthetic mode without synthetic data.
    """
    mode = check_mode(mode)
    if mode == "real":
        return [Stage("train", [real])]
    if synthetic is None or len(synthetic) == 0:
        raise InputError(f"mode {mode!r} needs synthetic images; pass --synthetic DIR (a folder with manifest.csv)")
    if mode == "mix":
        return [Stage("train", [real, synthetic])]
    if mode == "pretrain-finetune":
        return [Stage("pretrain", [synthetic], shared=True), Stage("finetune", [real], evaluate_start=True)]
    if mode == "synthetic-only":
        return [Stage("pretrain", [synthetic], shared=True)]
    raise InputError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}")

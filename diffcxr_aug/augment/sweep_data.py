"""What every run of a classifier sweep shares, and how a run is scored: the real splits (checked), the image
pipeline of one classifier, the phantom world's truth of the test split, and the mAUC with its bootstrap interval
over the labels that have enough of each class."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffcxr_aug.augment.results import result_columns
from diffcxr_aug.classifiers.metrics import bootstrap_mauc_ci, mask_thin_labels, per_label_auc, scorable_labels
from diffcxr_aug.classifiers.models import ClassifierConfig, create_classifier, data_config
from diffcxr_aug.classifiers.train import build_transforms
from diffcxr_aug.config import ClassifierSection
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.data.phantom.findings import findings_in, truth_labels
from diffcxr_aug.errors import InputError


def _check_split(manifest: Manifest, split: str, label_names: list[str]) -> Manifest:
    part = manifest.split(split)
    if len(part) == 0:
        raise InputError(f"{manifest.source}: the {split} split is empty; the sweep needs train, val and test rows")
    if split != "train" and not scorable_labels(part.labels(label_names)).any():
        raise InputError(
            f"{manifest.source}: no label has both a positive and a negative in the {split} split, so its mAUC "
            "is undefined; give that split more images"
        )
    return part


@dataclass
class SweepData:
    """What every run of one sweep shares: the real splits, the image pipeline and the test truth."""

    train: Manifest
    label_names: list[str]
    data_config: dict[str, Any]
    classifier_config: ClassifierConfig
    train_tf: Any
    val_set: CXRDataset
    test_set: CXRDataset
    test_paths: np.ndarray
    # The phantom world's truth for the test split (every label 1 or 0), or None for data without it.
    test_truth: np.ndarray | None
    columns: list[str]


def split_truth(manifest: Manifest, label_names: list[str]) -> np.ndarray | None:
    """``(images, labels)`` truth of a phantom split from its ``meta_findings`` column; None without that column.

    Labels the world does not know (any outside the 14 CheXpert labels) are NaN (not scored).
    """
    if "meta_findings" not in manifest.frame.columns:
        return None
    rows = []
    for number, text in zip(manifest.frame.index, manifest.frame["meta_findings"].fillna(""), strict=True):
        try:
            labels = truth_labels(findings_in(text))
        except ValueError as error:
            raise InputError(f"{manifest.source} row {number + 2}, meta_findings: {error}") from None
        rows.append([labels.get(name, np.nan) for name in label_names])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(label_names))


def load_sweep_data(data: str | os.PathLike, section: ClassifierSection, model: str, progress: bool) -> SweepData:
    real = read_manifest(data)
    label_names = real.label_names
    if not label_names:
        raise InputError(f"{real.source}: no label columns; a classifier needs at least one")
    train_split = _check_split(real, "train", label_names)
    val_split = _check_split(real, "val", label_names)
    test_split = _check_split(real, "test", label_names)
    truth = split_truth(test_split, label_names)
    if section.metric == "truth" and truth is None:
        raise InputError(
            f"{real.source}: classifier.metric 'truth' scores against the phantom world's truth, but the manifest "
            "has no meta_findings column (not a phantom dataset); use metric 'report'"
        )
    # The model's data config fixes the image size and normalisation for every run.
    probe = create_classifier(model, len(label_names), pretrained=False)
    config = data_config(probe, section.image_size)
    del probe
    size = int(config["input_size"][-1])
    classifier_config = ClassifierConfig(
        model=model,
        label_names=label_names,
        image_size=size,
        mean=float(config["mean"][0]),
        std=float(config["std"][0]),
    )
    eval_tf = build_transforms(config["mean"], config["std"], train=False)
    return SweepData(
        train=train_split,
        label_names=label_names,
        data_config=json.loads(json.dumps(config)),
        classifier_config=classifier_config,
        train_tf=build_transforms(
            config["mean"], config["std"], train=True, augment=section.augment, hflip=section.hflip
        ),
        val_set=CXRDataset(val_split, size, label_names, transform=eval_tf, progress=progress),
        test_set=CXRDataset(test_split, size, label_names, transform=eval_tf, progress=progress),
        test_paths=test_split.frame["image_path"].to_numpy(),
        test_truth=truth,
        columns=result_columns(label_names, truth=truth is not None),
    )


def score_run(
    y_true: np.ndarray, y_score: np.ndarray, names: list[str], section: ClassifierSection, seed: int, kind: str = ""
) -> dict[str, Any]:
    """mAUC, its bootstrap CI, labels scored and per-label AUCs over the labels with ``min_label_support`` of each
    class; ``kind`` ``truth`` names the columns of the scores against the world's truth (``mauc_truth``, ...)."""
    y_true = mask_thin_labels(y_true, section.min_label_support)
    aucs = per_label_auc(y_true, y_score, names)
    low = high = math.nan
    if aucs.scored:
        low, high = bootstrap_mauc_ci(
            y_true, y_score, n_bootstrap=section.n_bootstrap, rng=np.random.default_rng(seed)
        )
    mauc, auc = ("mauc_truth", "auc_truth_") if kind == "truth" else ("mauc", "auc_")
    return {
        mauc: aucs.mauc,
        **{f"{auc}{n}": aucs.per_label[n] for n in names},
        f"{mauc}_ci_low": low,
        f"{mauc}_ci_high": high,
        "n_labels_truth" if kind == "truth" else "n_labels_scored": len(aucs.scored),
    }

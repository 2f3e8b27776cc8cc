"""Faithfulness of generated images: does a classifier trained on real images find the prompt's findings?

The paper's mAUC measure: train a multi-label classifier on *real* images, run it on images generated
from reports, and score its outputs against the labels of those reports (the labels the synthetic
manifest copies from each prompt's row). A generator that draws the reported findings scores high; one
that ignores the report scores near 0.5. The same classifier's mAUC on the real test split is reported
beside it as the ceiling.

The judge is built and trained with :mod:`diffcxr_aug.classifiers` (timm model, ``in_chans=1``, masked
BCE, early stopping on the real val split) and saved in ``OUT/reference_classifier``, so that later sets
are scored by the same classifier.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcxr_aug.classifiers.metrics import per_label_auc
from diffcxr_aug.classifiers.models import (
    WEIGHTS_NAME,
    ClassifierConfig,
    create_classifier,
    data_config,
    load_classifier,
)
from diffcxr_aug.classifiers.train import HISTORY_NAME, build_transforms, predict, seeded, train_classifier
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_write_json, atomic_write_text

# The reference classifier's defaults (a recipe's evaluate section starts from these).
REFERENCE_MODEL = "resnet10t"
REFERENCE_EPOCHS = 8

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "reference_classifier"


def masked_auc(y_true: np.ndarray, y_score: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-label ROC AUC over the certain (0/1) cells, and their mean over labels with both classes."""
    result = per_label_auc(y_true, y_score, names)
    per_label = {name: float(result.per_label[name]) for name in result.scored}
    return {"mauc": float(result.mauc), "per_label": per_label, "n_images": int(len(y_true))}


def judge_labels(real: Manifest) -> list[str]:
    """The labels the reference classifier learns: the CheXpert labels the manifest has, then any other label
    column (a collection's own, e.g. ieee8023's COVID-19) with a positive and a negative in the train split."""
    chexpert = [name for name in CHEXPERT_LABELS if name in real.label_names]
    train = real.split("train").frame
    others = [
        name
        for name in real.label_names
        if name not in CHEXPERT_LABELS and (train[name] == 1).any() and (train[name] == 0).any()
    ]
    return chexpert + others or real.label_names


def reference_classifier(
    real: Manifest,
    folder: Path,
    size: int,
    labels: list[str],
    model_name: str = REFERENCE_MODEL,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    mixed_precision: str = "no",
) -> tuple[torch.nn.Module, ClassifierConfig]:
    """The judge: loaded from ``folder`` when it was trained before, else trained on ``real``'s train split
    (best val-split mAUC kept, under the ``mixed_precision`` autocast: ``no``, ``bf16`` or ``fp16``) and saved
    there."""
    # Weights without the history are an interrupted run's best epoch so far: trained again, not trusted.
    if (folder / WEIGHTS_NAME).is_file() and (folder / HISTORY_NAME).is_file():
        model, config = load_classifier(folder, device)
        asked = {"model": model_name, "image_size": size, "label_names": list(labels)}
        found = {"model": config.model, "image_size": config.image_size, "label_names": list(config.label_names)}
        if asked != found:
            changed = {k: (found[k], asked[k]) for k in asked if asked[k] != found[k]}
            raise InputError(
                f"{folder} holds a reference classifier trained with other settings (cached, asked: {changed}); "
                "pass another --out, or delete that folder to train a new one"
            )
        logger.info("Reusing the reference classifier in %s (%s)", folder, config.model)
        return model.eval(), config
    train, val = real.split("train"), real.split("val")
    if len(train) == 0 or len(val) == 0:
        raise InputError(f"{real.source}: the reference classifier needs non-empty train and val splits")
    with seeded(seed, device):
        model = create_classifier(model_name, len(labels))
    config = data_config(model, size)
    classifier_config = ClassifierConfig(
        model=model_name,
        label_names=labels,
        image_size=size,
        mean=float(config["mean"][0]),
        std=float(config["std"][0]),
    )
    train_set = CXRDataset(train, size, labels, transform=build_transforms(config["mean"], config["std"], train=True))
    eval_tf = build_transforms(config["mean"], config["std"], train=False)
    val_set = CXRDataset(val, size, labels, transform=eval_tf)
    train_classifier(
        model,
        train_set,
        val_set,
        folder,
        classifier_config,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=1e-4,
        patience=max(2, epochs // 3),
        device=device,
        seed=seed,
        desc="reference classifier",
        mixed_precision=mixed_precision,
    )
    return model.eval(), classifier_config


def score(
    model: torch.nn.Module, config: ClassifierConfig, manifest: Manifest, device: torch.device
) -> dict[str, Any]:
    """mAUC of ``model`` on every row of ``manifest`` against the manifest's labels."""
    transform = build_transforms((config.mean,), (config.std,), train=False)
    dataset = CXRDataset(manifest, config.image_size, config.label_names, transform=transform, progress=False)
    y_true, y_score = predict(model, dataset, device, progress=False, desc="faithfulness")
    return masked_auc(y_true, y_score, config.label_names)


def evaluate_faithfulness(
    real: str | os.PathLike,
    synthetic: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    size: int = 64,
    model_name: str = REFERENCE_MODEL,
    epochs: int = REFERENCE_EPOCHS,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Score the real test split and each synthetic set with one classifier trained on real images.

    Args:
        real: the real manifest (folder or CSV).
        synthetic: name -> synthetic manifest folder (e.g. ``{"on": ..., "off": ...}`` for AVA-TLS); every
            set is scored by the same classifier, so the comparison is fair.
        out: folder for ``reference_classifier/`` (reused when present), ``faithfulness.json`` and
            ``faithfulness.md``.
        size: image side the classifier sees.
        model_name: a timm model name.
        epochs, batch_size: classifier training.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: classifier initialisation and data order.

    Returns:
        ``{"real_test": {...}, "<name>": {"mauc", "per_label", "n_images"}, "classifier": {...}}``.
    """
    from diffcxr_aug.runtime import resolve_device

    out = Path(out)
    dev = resolve_device(device)
    real_manifest = read_manifest(real)
    labels = judge_labels(real_manifest)
    model, config = reference_classifier(
        real_manifest,
        out / CLASSIFIER_DIR,
        size,
        labels,
        model_name=model_name,
        epochs=epochs,
        batch_size=batch_size,
        device=dev,
        seed=seed,
    )
    results: dict[str, Any] = {
        "classifier": {
            "model": config.model,
            "size": config.image_size,
            "labels": config.label_names,
            "folder": str(out / CLASSIFIER_DIR),
        }
    }
    test = real_manifest.split("test")
    if len(test):
        results["real_test"] = score(model, config, test, dev)
    for name, folder in synthetic.items():
        results[name] = score(model, config, read_manifest(folder), dev)
        logger.info(
            "faithfulness %s: mAUC %.3f over %d images", name, results[name]["mauc"], results[name]["n_images"]
        )
    atomic_write_json(out / "faithfulness.json", results)
    atomic_write_text(out / "faithfulness.md", faithfulness_table(results))
    return results


def faithfulness_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per scored set, mAUC and the per-label AUCs."""
    sets = [k for k in results if k != "classifier"]
    labels = sorted({label for k in sets for label in results[k]["per_label"]})
    lines = [
        "| set | images | mAUC | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for k in sets:
        r = results[k]
        cells = [f"{r['per_label'][label]:.3f}" if label in r["per_label"] else "" for label in labels]
        lines.append(f"| {k} | {r['n_images']} | {r['mauc']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + json.dumps(results["classifier"]) + "\n"

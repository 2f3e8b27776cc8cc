"""Faithfulness of generated images: does a classifier trained on real images find the prompt's findings?

The paper's mAUC measure: train a multi-label classifier on *real* images, run it on images generated
from reports, and score its outputs against the labels of those reports (the labels the synthetic
manifest copies from each prompt's row). A generator that draws the reported findings scores high; one
that ignores the report scores near 0.5. The same classifier's mAUC on the real test split is reported
beside it as the ceiling.

The classifier here is a deliberately small local loop (timm ``resnet10t``, ``in_chans=1``, masked BCE,
AdamW): ``diffcxr_aug.classifiers`` was being written in parallel and was not on ``main`` yet; the loop
is to be replaced by it.
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
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CLASSIFIER_DIR = "reference_classifier"


def masked_auc(y_true: np.ndarray, y_score: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-label ROC AUC over the certain (0/1) cells, and their mean over labels with both classes."""
    from sklearn.metrics import roc_auc_score

    per_label: dict[str, float] = {}
    for j, name in enumerate(names):
        known = (y_true[:, j] == 0) | (y_true[:, j] == 1)
        target = y_true[known, j]
        if known.any() and 0 < target.sum() < len(target):
            per_label[name] = float(roc_auc_score(target, y_score[known, j]))
    mauc = float(np.mean(list(per_label.values()))) if per_label else float("nan")
    return {"mauc": mauc, "per_label": per_label, "n_images": int(len(y_true))}


def _loader(manifest: Manifest, size: int, labels: list[str], batch_size: int, shuffle: bool, seed: int):
    dataset = CXRDataset(manifest, size, label_names=labels, progress=False)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_reference_classifier(
    real: Manifest,
    size: int,
    labels: list[str],
    model_name: str = "resnet10t",
    epochs: int = 8,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    device: str = "auto",
    seed: int = 0,
) -> torch.nn.Module:
    """A timm classifier trained from scratch on the train split of ``real`` (uncertain/unknown cells masked)."""
    import timm

    from diffcxr_aug.runtime import resolve_device

    dev = resolve_device(device)
    train = real.split("train")
    if len(train) == 0:
        raise ValueError(f"{real.source}: the train split is empty; cannot train the reference classifier")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(model_name, pretrained=False, num_classes=len(labels), in_chans=1).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    loader = _loader(train, size, labels, batch_size, shuffle=True, seed=seed)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * len(loader))
    model.train()
    for epoch in tqdm(range(epochs), desc=f"reference classifier {model_name}", unit="epoch"):
        for batch in loader:
            targets = batch["labels"].to(dev)
            known = (targets == 0) | (targets == 1)
            logits = model(_normalise(batch["image"].to(dev)))
            loss = F.binary_cross_entropy_with_logits(logits, torch.where(known, targets, 0.0), reduction="none")
            loss = (loss * known).sum() / known.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        logger.debug("reference classifier epoch %d: loss %.4f", epoch + 1, float(loss))
    return model.eval()


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.25


@torch.no_grad()
def predict(model: torch.nn.Module, manifest: Manifest, size: int, labels: list[str], batch_size: int = 128):
    """Sigmoid scores and the stored labels (1/0/-1/NaN) of every row, in row order."""
    dev = next(model.parameters()).device
    scores, targets = [], []
    for batch in _loader(manifest, size, labels, batch_size, shuffle=False, seed=0):
        scores.append(torch.sigmoid(model(_normalise(batch["image"].to(dev))).float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    return np.concatenate(targets), np.concatenate(scores)


def evaluate_faithfulness(
    real: str | os.PathLike,
    synthetic: Mapping[str, str | os.PathLike],
    out: str | os.PathLike | None = None,
    size: int = 64,
    model_name: str = "resnet10t",
    epochs: int = 8,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Train one classifier on the real train split, then score the real test split and each synthetic set.

    Args:
        real: the real manifest (folder or CSV).
        synthetic: name -> synthetic manifest folder (e.g. ``{"ava_tls_on": ..., "ava_tls_off": ...}``); every
            set is scored by the same classifier, so the comparison is fair.
        out: optional folder for ``faithfulness.json`` and ``faithfulness.md``.
        size: image side the classifier sees.
        model_name: a timm model name.
        epochs, batch_size: classifier training.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: classifier initialisation and data order.

    Returns:
        ``{"real_test": {...}, "<name>": {"mauc", "per_label", "n_images"}, "classifier": {...}}``.
    """
    real_manifest = read_manifest(real)
    labels = [name for name in CHEXPERT_LABELS if name in real_manifest.label_names] or real_manifest.label_names
    model = train_reference_classifier(
        real_manifest,
        size,
        labels,
        model_name=model_name,
        epochs=epochs,
        batch_size=batch_size,
        device=device,
        seed=seed,
    )
    results: dict[str, Any] = {
        "classifier": {"model": model_name, "epochs": epochs, "size": size, "seed": seed, "labels": labels}
    }
    test = real_manifest.split("test")
    if len(test):
        results["real_test"] = masked_auc(*predict(model, test, size, labels), labels)
    for name, folder in synthetic.items():
        results[name] = masked_auc(*predict(model, read_manifest(folder, check_splits=False), size, labels), labels)
        logger.info(
            "faithfulness %s: mAUC %.3f over %d images", name, results[name]["mauc"], results[name]["n_images"]
        )
    if out is not None:
        out = Path(out)
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

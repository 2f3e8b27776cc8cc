"""One explicit multi-label training loop: masked BCE, AdamW + cosine, early stopping on validation mAUC.

Labels arrive as 1/0/-1/NaN. The uncertainty policy decides what ``-1`` means for training (CheXpert's
U-Ignore, U-Ones, U-Zeros); NaN (not mentioned) is always masked out of the loss, never guessed.
Validation and test scores use only the certain 0/1 cells (see :mod:`diffcxr_aug.classifiers.metrics`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from diffcxr_aug.classifiers.metrics import per_label_auc
from diffcxr_aug.classifiers.models import WEIGHTS_NAME, ClassifierConfig, save_classifier
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_write_text
from diffcxr_aug.runtime import autocast
from diffcxr_aug.types import UncertaintyPolicy

# Written last, when training has finished: a folder with weights but no history is an interrupted run's.
HISTORY_NAME = "history.json"

logger = logging.getLogger(__name__)

UNCERTAINTY_POLICIES: tuple[str, ...] = get_args(UncertaintyPolicy)


def apply_uncertainty(labels: torch.Tensor, policy: UncertaintyPolicy) -> torch.Tensor:
    """Training targets from 1/0/-1/NaN labels: ``-1`` becomes NaN (ignore), 1 (U-Ones) or 0 (U-Zeros)."""
    if policy == "ignore":
        value = float("nan")
    elif policy == "ones":
        value = 1.0
    elif policy == "zeros":
        value = 0.0
    else:
        raise ValueError(f"Unknown uncertainty policy {policy!r}; choose one of: {', '.join(UNCERTAINTY_POLICIES)}")
    return torch.where(labels == -1, torch.full_like(labels, value), labels)


def masked_bce_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the known (non-NaN) target cells only.

    A batch without a single known cell gives a zero loss that still belongs to the graph, so the
    training step runs and changes nothing.
    """
    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets, nan=0.0), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def build_transforms(
    mean: tuple[float, ...], std: tuple[float, ...], train: bool, augment: bool = True, hflip: bool = False
) -> v2.Compose:
    """Radiograph transforms for ``1 x H x W`` tensors in [0, 1], ending in timm's normalisation.

    Training augmentation is mild on purpose: a few degrees of rotation, 5% shift and scale, 10%
    brightness and contrast. Horizontal flips are off by default because laterality carries meaning in a
    chest film (the heart sits left; a flip turns a normal film into situs inversus).
    """
    steps: list = []
    if train and augment:
        steps += [
            v2.RandomAffine(degrees=5.0, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's random state afterwards.

    Model initialisation and the transforms' random draws use torch's default generator; forking it keeps
    a run reproducible without leaving global state changed behind it.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _images(batch: dict, device: torch.device) -> torch.Tensor:
    # Channels-last: the layout the convolutions of timm's CNNs run fastest in on CPUs and tensor cores.
    return batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "predict",
    mixed_precision: str = "no",
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores for every sample, in dataset order, and the labels as stored (1/0/-1/NaN)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        with autocast(device, mixed_precision):
            logits = model(_images(batch, device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(labels), np.concatenate(scores)


@dataclass
class TrainResult:
    """What a training run chose: the best validation mAUC, its epoch (0 = the starting weights) and the
    per-epoch history (train loss, validation mAUC, learning rate)."""

    best_val_mauc: float
    best_epoch: int
    epochs_run: int
    steps: int
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_history(cls, path: str | Path) -> TrainResult:
        """The result of a finished run from its ``history.json`` (the best epoch is the first best one, as in
        training; ``steps`` is -1 for a history written before it recorded them)."""
        history = json.loads(Path(path).read_text(encoding="utf-8"))
        scores = [-math.inf if h["val_mauc"] is None else h["val_mauc"] for h in history]
        best = max(range(len(history)), key=lambda i: (scores[i], -i))
        return cls(
            best_val_mauc=scores[best],
            best_epoch=int(history[best]["epoch"]),
            epochs_run=int(history[-1]["epoch"]),
            steps=int(history[-1].get("step", -1)),
            history=history,
        )


def train_classifier(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    checkpoint_dir: str | Path,
    config: ClassifierConfig,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    patience: int,
    uncertainty: UncertaintyPolicy = "ignore",
    samples_per_epoch: int | None = None,
    device: torch.device = torch.device("cpu"),
    mixed_precision: str = "no",
    seed: int = 0,
    num_workers: int = 0,
    evaluate_start: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` on ``train_set``, keeping the weights with the best validation mAUC.

    Each epoch draws ``samples_per_epoch`` images (default: one pass over ``train_set``) in an order
    fixed by ``seed``; a drawn count above the set size repeats it, each pass in a fresh order. So runs on
    a 1% subset and on the full split can be given the same number of steps. The learning rate follows a
    cosine from ``learning_rate`` to zero over all planned steps. Training stops after ``patience`` epochs
    without a better validation mAUC. The best weights are written to ``checkpoint_dir`` (safetensors
    plus ``config.json``) whenever they improve, and loaded back into ``model`` at the end.

    Args:
        mixed_precision: ``no`` (fp32), ``bf16`` or ``fp16`` autocast for training and validation; fp16 scales the
            loss (a GPU's ``GradScaler``) so small gradients do not underflow.
        evaluate_start: also score the starting weights (epoch 0) as a candidate; for fine-tuning, so
            that a fine-tune which only hurts keeps the pretrained weights.
    """
    if uncertainty not in UNCERTAINTY_POLICIES:
        raise ValueError(
            f"Unknown uncertainty policy {uncertainty!r}; choose one of: {', '.join(UNCERTAINTY_POLICIES)}"
        )
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    checkpoint_dir = Path(checkpoint_dir)
    model.to(device, memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
    generator = torch.Generator().manual_seed(seed)
    num_samples = samples_per_epoch or len(train_set)
    sampler = RandomSampler(train_set, replacement=False, num_samples=num_samples, generator=generator)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # A last batch of one image would break BatchNorm; drop it when there is more than one batch.
        drop_last=num_samples > batch_size,
        pin_memory=device.type == "cuda",
        generator=generator,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    eval_batch = max(batch_size, 64)

    def validate(tag: str) -> float:
        y_true, y_score = predict(
            model, val_set, device, eval_batch, num_workers, progress, f"{desc} {tag} val", mixed_precision
        )
        return per_label_auc(y_true, y_score).mauc

    # The augmentation (and each loader's base seed) draws from torch's default generator: seeded here, so a run
    # does not depend on what the caller's process drew before it; the caller's state is restored afterwards.
    with seeded(seed, device):
        best, best_epoch, stale, step, history = -math.inf, -1, 0, 0, []
        if evaluate_start:
            best, best_epoch = validate("start"), 0
            save_classifier(model, config, checkpoint_dir)
            history.append({"epoch": 0, "train_loss": None, "val_mauc": best, "lr": None, "step": 0})
            logger.info("%s: starting weights, val mAUC %.4f", desc, best)
        epoch = 0
        for epoch in range(1, epochs + 1):
            model.train()
            running, batches = 0.0, 0
            bar = tqdm(loader, desc=f"{desc} epoch {epoch}/{epochs}", disable=not progress, leave=False, unit="batch")
            for batch in bar:
                targets = apply_uncertainty(batch["labels"], uncertainty).to(device, non_blocking=True)
                with autocast(device, mixed_precision):
                    logits = model(_images(batch, device))
                loss = masked_bce_with_logits(logits.float(), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: loss is {loss.item()} at epoch {epoch}, step {step}; lower classifier.learning_rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                running += loss.item()
                batches += 1
                bar.set_postfix(loss=f"{running / batches:.4f}")
            val_mauc = validate(f"epoch {epoch}")
            train_loss = running / max(batches, 1)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_mauc": val_mauc,
                    "lr": scheduler.get_last_lr()[0],
                    "step": step,
                }
            )
            logger.info("%s epoch %d: train loss %.4f, val mAUC %.4f", desc, epoch, train_loss, val_mauc)
            if val_mauc > best:
                best, best_epoch, stale = val_mauc, epoch, 0
                save_classifier(model, config, checkpoint_dir)
            else:
                stale += 1
                if stale >= patience:
                    logger.info("%s: no better val mAUC for %d epochs; stopping at epoch %d", desc, patience, epoch)
                    break
    if best_epoch < 0:
        raise InputError(f"{desc}: validation mAUC was never finite; the validation split has no scorable label")
    model.load_state_dict(load_file(str(checkpoint_dir / WEIGHTS_NAME), device=str(device)))
    atomic_write_text(checkpoint_dir / HISTORY_NAME, json.dumps(history, indent=2) + "\n")
    return TrainResult(best_val_mauc=best, best_epoch=best_epoch, epochs_run=epoch, steps=step, history=history)

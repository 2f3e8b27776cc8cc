"""Fidelity of synthetic images in a feature space: FID and KID (torchmetrics), improved precision and recall.

The features come from :func:`embed` (a timm classifier's penultimate layer); see :mod:`.report`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffcxr_aug.classifiers.models import ClassifierConfig
from diffcxr_aug.classifiers.train import build_transforms
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.runtime import autocast

PR_NEIGHBOURS = 3  # k of improved precision/recall (Kynkäänniemi et al. use 3)
PER_LABEL_MIN_IMAGES = 20  # positives a side before a label gets its own FID


class _Features(torch.nn.Module):
    """Hands precomputed feature rows to torchmetrics unchanged (its ``num_features`` sizes the state)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    config: ClassifierConfig,
    manifest: Manifest,
    device: torch.device,
    batch_size: int = 64,
    desc: str = "features",
    mixed_precision: str = "no",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate-layer features, sigmoid scores and stored labels of every row of ``manifest``.

    timm models split into ``forward_features`` and ``forward_head``; ``pre_logits=True`` gives the pooled
    vector the classifier's last layer reads. ``mixed_precision`` (``no``, ``bf16``, ``fp16``) is the autocast the
    model runs under; features and scores are returned in fp32 either way.
    """
    transform = build_transforms((config.mean,), (config.std,), train=False)
    dataset = CXRDataset(manifest, config.image_size, config.label_names, transform=transform, progress=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    features, scores, labels = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        with autocast(device, mixed_precision):
            pooled = model.forward_head(model.forward_features(batch["image"].to(device)), pre_logits=True)
            logits = model.get_classifier()(pooled)
        features.append(pooled.float().cpu().numpy())
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(features), np.concatenate(scores), np.concatenate(labels)


def fid_kid(real: np.ndarray, fake: np.ndarray, seed: int = 0, fid_images: int | None = None) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two feature sets, by torchmetrics.

    FID is biased upwards by about 1/n, so sets compared with each other (and with the real-to-real floor) must
    be measured on the same number of images: ``fid_images`` draws that many rows of ``fake`` (seeded) for FID.
    KID is unbiased and uses every row.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (got {len(real)} real, {len(fake)} synthetic)")
    width = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Features(width), reset_real_features=False)
    subset = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # it keeps every feature row; these are already features, and few
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=_Features(width), subsets=50, subset_size=subset)
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    n_fid = len(fake) if fid_images is None else min(fid_images, len(fake))
    if n_fid < len(fake):
        f_fid = f[np.sort(np.random.default_rng(seed).choice(len(fake), n_fid, replace=False))]
    else:
        f_fid = f
    fid.update(r, real=True)
    fid.update(f_fid, real=False)
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "n_real": len(real),
        "n_synthetic": len(fake),
        "n_synthetic_fid": n_fid,
    }


def feature_distances(
    real: np.ndarray, fake: np.ndarray, seed: int = 0, fid_images: int | None = None
) -> dict[str, float]:
    """:func:`fid_kid`, improved precision and recall (:func:`precision_recall`) and density and coverage
    (:func:`density_coverage`), on every row."""
    enough = min(len(real), len(fake)) > PR_NEIGHBOURS
    return {
        **fid_kid(real, fake, seed, fid_images),
        # None for sets too small to have k neighbours (tiny test manifests).
        **(
            {**precision_recall(real, fake), **density_coverage(real, fake)}
            if enough
            else {"precision": None, "recall": None, "density": None, "coverage": None, "pr_neighbours": PR_NEIGHBOURS}
        ),
    }


def per_label_fidelity(
    test: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    fake: tuple[np.ndarray, np.ndarray],
    names: list[str],
    min_images: int = PER_LABEL_MIN_IMAGES,
    seed: int = 0,
) -> dict[str, dict]:
    """Conditional FID and KID: for each label, the synthetic images whose prompt states it against the real test
    images that show it, and the floor (real val against real test images with it) on as many images.

    ``test``, ``val``, ``fake``: ``(features, labels)`` with labels as ``embed`` returns them (1 = positive). A
    label with fewer than ``min_images`` positives on any side gets its counts and a note, not a number.
    """
    out: dict[str, dict] = {}
    for j, name in enumerate(names):
        t, v, f = (x[labels[:, j] == 1] for x, labels in (test, val, fake))
        entry: dict[str, Any] = {"n_real": len(t), "n_val": len(v), "n_synthetic": len(f)}
        if min(len(t), len(v), len(f)) < min_images:
            entry["note"] = f"fewer than {min_images} positive images on a side"
        else:
            n = min(len(v), len(f))
            entry.update(fid_kid(t, f, seed, n))
            floor = fid_kid(t, v, seed, n)
            entry["floor"] = {"fid": floor["fid"], "kid": floor["kid"], "n_val_fid": floor["n_synthetic_fid"]}
        out[name] = entry
    return out


def _inside(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query lies in at least one ball ``||q - support_i|| <= radii_i``."""
    from sklearn.metrics import pairwise_distances_chunked

    def reduce(chunk: np.ndarray, start: int) -> np.ndarray:
        return (chunk <= radii[None, :]).any(axis=1)

    return np.concatenate(list(pairwise_distances_chunked(queries, support, reduce_func=reduce)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of ``fake`` against ``real`` features.

    Each set's manifold is the union of balls around its rows reaching their k-th nearest neighbour in the same
    set. Precision: the share of synthetic rows inside the real manifold (images that look like some real image;
    a malformed or noise-like image falls outside). Recall: the share of real rows inside the synthetic manifold
    (how much of the real variety is covered). Both depend on the set sizes, so compare sets of equal size.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} rows per set ({len(real)}, {len(fake)})")
    return {
        "precision": float(_inside(fake, real, _kth_neighbour_radii(real, k)).mean()),
        "recall": float(_inside(real, fake, _kth_neighbour_radii(fake, k)).mean()),
        "pr_neighbours": k,
    }


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return distances[:, k]  # column 0 is the row itself


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """Density and coverage (Naeem et al., ICML 2020) of ``fake`` against ``real`` features.

    Both use only the real manifold (balls around real rows reaching their k-th nearest real neighbour), so one
    outlying real image cannot inflate them as it inflates recall. Density: the mean number of real balls holding a
    synthetic row, divided by k (about 1 when synthetic rows are spread as real ones are; above 1 when they crowd
    the dense regions). Coverage: the share of real balls holding at least one synthetic row (the real variety
    covered, bounded by 1).
    """
    from sklearn.metrics import pairwise_distances_chunked

    if min(len(real), len(fake)) <= k:
        raise ValueError(f"density/coverage with k={k} needs more than {k} rows per set ({len(real)}, {len(fake)})")
    radii = _kth_neighbour_radii(real, k)
    inside_counts = np.zeros(len(fake))
    covered = np.zeros(len(real), dtype=bool)
    start = 0
    for chunk in pairwise_distances_chunked(fake, real):  # rows: synthetic, columns: real
        inside = chunk <= radii[None, :]
        inside_counts[start : start + len(chunk)] = inside.sum(axis=1)
        covered |= inside.any(axis=0)
        start += len(chunk)
    return {"density": float(inside_counts.sum() / (k * len(fake))), "coverage": float(covered.mean())}
